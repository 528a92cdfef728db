// The public API, as any client calls it: keys from this tab's sessionStorage, OpenAI-shaped errors, SSE.

const KEYS = { api: "unlock.apiKey", admin: "unlock.adminKey" };

export class APIError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

// null: never asked in this tab; "" : asked, and the server needs none.
export const getKey = (kind = "api") => sessionStorage.getItem(KEYS[kind]);
export const setKey = (kind, value) => sessionStorage.setItem(KEYS[kind], value);

function headers(kind, extra = {}) {
  const key = getKey(kind) || (kind === "admin" ? getKey("api") : "");
  return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  let param = null;
  try {
    const body = await response.json();
    const error = body.error ?? body;
    message = typeof error.message === "string" ? error.message : JSON.stringify(error);
    param = error.param ?? null;
  } catch {
    // not JSON: keep the status line
  }
  return new APIError(response.status, message, param);
}

export async function call(path, { method = "GET", json, body, kind = "api", contentType } = {}) {
  const extra = json !== undefined ? { "Content-Type": "application/json" } : {};
  if (contentType) extra["Content-Type"] = contentType;
  const response = await fetch(path, {
    method,
    headers: headers(kind, extra),
    body: json !== undefined ? JSON.stringify(json) : body,
  });
  if (!response.ok) throw await failure(response);
  return { body: await response.json(), headers: response.headers };
}

// POST a streamed OpenAI request; onText(piece) for each text delta. Returns the response headers.
export async function stream(path, json, onText) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers("api", { "Content-Type": "application/json" }),
    body: JSON.stringify({ ...json, stream: true }),
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    const events = buffered.split("\n\n");
    buffered = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "").trim();
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new APIError(chunk.error.code ?? 500, chunk.error.message, null);
      const choice = chunk.choices?.[0];
      const piece = choice?.text ?? choice?.delta?.content ?? "";
      if (piece) onText(piece);
    }
  }
  return response.headers;
}
