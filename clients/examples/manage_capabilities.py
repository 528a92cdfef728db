"""Upload, list, show and delete capabilities with the Python client (sync; `AsyncUnlockClient` is the twin).

    .venv/bin/python clients/examples/manage_capabilities.py path/to/capability.safetensors
Environment: UNLOCK_BASE_URL, UNLOCK_ADMIN_KEY (writes), UNLOCK_API_KEY.
"""

import os
import sys

from unlock_client import UnlockClient

key = os.environ.get("UNLOCK_ADMIN_KEY") or os.environ.get("UNLOCK_API_KEY")
with UnlockClient(os.environ.get("UNLOCK_BASE_URL", "http://127.0.0.1:8000"), api_key=key) as client:
    created = client.upload(sys.argv[1], name="example", replace=True)
    print("uploaded", created["name"], created["sha256"][:12], created["mode"], created["layers"])
    print("registered:", [c["name"] for c in client.list()])
    print("show:", client.get("example")["default_strength"])
    print(client.delete("example"))
