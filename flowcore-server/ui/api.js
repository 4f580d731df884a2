// The HTTP API, as the console calls it. The API key lives in this tab's sessionStorage and
// goes in the `x-api-key` header of every call, never in a URL (URLs reach logs and history).
// That is also why events are read with fetch rather than EventSource: EventSource cannot
// send a header.

const KEY = 'flowcore.api_key';

export const session = {
  key: () => sessionStorage.getItem(KEY),
  signIn: (key) => sessionStorage.setItem(KEY, key),
  signOut: () => sessionStorage.removeItem(KEY),
};

/** An error answer of the API: its status, `code`, `message` and `details`. */
export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

function headers(extra) {
  return {'x-api-key': session.key() || '', ...extra};
}

async function failure(response, key) {
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON: shown as the status */ }
  const e = body && body.error ? body.error : {};
  // The page signs out only when the refused key is still the one in use: a late answer to
  // a request made with an earlier key changes nothing.
  if (response.status === 401) window.dispatchEvent(new CustomEvent('flowcore:unauthorized', {detail: key}));
  return new ApiError(response.status, e.code || `http_${response.status}`,
    e.message || response.statusText || 'request failed', e.details);
}

/** Calls `/api/v1{path}`; the answer's JSON, or an ApiError. */
export async function api(method, path, body, init) {
  const key = session.key();
  const options = {method, headers: headers(), ...init};
  if (body !== undefined) {
    options.headers['content-type'] = 'application/json';
    options.body = typeof body === 'string' ? body : JSON.stringify(body);
  }
  const response = await fetch(`/api/v1${path}`, options);
  if (!response.ok) throw await failure(response, key);
  if (response.status === 204) return null;
  return response.json();
}

export const get = (path) => api('GET', path);
export const post = (path, body) => api('POST', path, body ?? {});

/**
 * A run's Server-Sent Events, as `{id, event, data}` with `data` parsed, until the stream
 * ends or `signal` aborts. `lastId` resumes after an event already seen.
 */
export async function* runEvents(runId, lastId, signal) {
  const key = session.key();
  const extra = {accept: 'text/event-stream'};
  if (lastId) extra['last-event-id'] = lastId;
  const response = await fetch(`/api/v1/runs/${encodeURIComponent(runId)}/events`,
    {headers: headers(extra), signal});
  if (!response.ok) throw await failure(response, key);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let event = {data: []};
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, '');
      buffer = buffer.slice(newline + 1);
      if (line === '') {
        if (event.data.length) {
          const text = event.data.join('\n');
          let data = text;
          try { data = JSON.parse(text); } catch { /* kept as text */ }
          yield {id: event.id, event: event.event || 'message', data};
        }
        event = {data: []};
      } else if (!line.startsWith(':')) {
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'data') event.data.push(val);
        else if (field === 'id') event.id = val;
        else if (field === 'event') event.event = val;
      }
    }
  }
}
