// The only way the console puts anything on the page. Text goes in as text nodes and
// attributes through setAttribute, never parsed as markup: a flow name or a step output
// holding `<script>` shows as those characters and never runs.

const SVG = 'http://www.w3.org/2000/svg';

// Attributes that load, run or restyle: never set from here (listeners go in as functions).
const REFUSED = new Set(['style', 'src', 'srcdoc', 'xlink:href', 'formaction', 'action', 'background']);

function set(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    const name = key.toLowerCase();
    if (name.startsWith('on')) {
      if (typeof value !== 'function') throw new Error(`refusing the attribute ${key}`);
      el.addEventListener(name.slice(2), value);
    } else if (REFUSED.has(name)) {
      throw new Error(`refusing the attribute ${key}`);
    } else if (name === 'href' && !/^#\//.test(String(value))) {
      // Links are the console's own routes: data never becomes a script URL or an outside one.
      throw new Error(`refusing the link ${value}`);
    } else {
      el.setAttribute(key, value === true ? '' : String(value));
    }
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** An HTML element: `h('a', {href: '#/flows'}, 'Flows')`. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  set(el, attrs);
  append(el, children);
  return el;
}

/** An SVG element, the same way. */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  set(el, attrs);
  append(el, children);
  return el;
}

/** Replaces an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** JSON shown as text, pretty. */
export function json(value) {
  return h('pre', {class: 'json'}, value === undefined ? '' : JSON.stringify(value, null, 2));
}

/** A status as a badge. */
export function badge(status) {
  return h('span', {class: `badge s-${token(status)}`}, status);
}

/** A value made safe to use in a class name (statuses, ports): letters, digits, `_`, `-`. */
export function token(value) {
  return String(value ?? '').replace(/[^A-Za-z0-9_-]/g, '');
}

/** A time as the reader's local time, with the exact UTC one on hover. */
export function time(iso) {
  if (!iso) return h('span', {class: 'muted'}, '—');
  const d = new Date(iso);
  return h('time', {datetime: iso, title: iso}, d.toLocaleString());
}

/** A duration between two times (or until now), short. */
export function duration(from, to) {
  if (!from) return '—';
  const ms = (to ? new Date(to) : new Date()) - new Date(from);
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
  if (ms < 3_600_000) return `${Math.floor(ms / 60_000)} min ${Math.round((ms % 60_000) / 1000)} s`;
  return `${(ms / 3_600_000).toFixed(1)} h`;
}

/** A route with its query: `route('#/runs', {status: 'failed'})`. */
export function route(path, query) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query || {})) if (v) q.set(k, v);
  const text = q.toString();
  return text ? `${path}?${text}` : path;
}

/** Calls `fn` once `ms` after the last call. */
export function debounce(fn, ms) {
  let timer;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}
