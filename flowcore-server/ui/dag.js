// A flow's DAG, laid out in layers and drawn as SVG.
//
// The layout is the classic layered one (Sugiyama): longest-path layers, long edges split by
// virtual points, a few barycenter sweeps against crossings, then coordinates pulled toward
// each node's neighbours. A library (dagre, elk) would weigh more than this whole console
// and need a build step; flows have tens of nodes, not thousands, and this is enough.

import {h, s, token} from './dom.js';

const W = 168;       // node width
const H = 46;        // node height
const GAP_X = 36;    // between nodes of a layer
const GAP_Y = 64;    // between layers
const PAD = 16;
/** Past these, a flow is listed instead of drawn: a layout must not freeze the tab. */
export const MAX_NODES = 400;
export const MAX_EDGES = 2000;
const MAX_VIRTUAL = 20000;

/**
 * Layers, order and coordinates of `nodes` ([{id}]) and `edges` ([{from, to, port}]); null
 * when the flow is too large to draw.
 */
export function layout(nodes, edges, direction = 'TB') {
  if (nodes.length > MAX_NODES || edges.length > MAX_EDGES) return null;
  const ids = new Set(nodes.map((n) => n.id));
  const live = edges.filter((e) => ids.has(e.from) && ids.has(e.to) && e.from !== e.to);
  const out = new Map(nodes.map((n) => [n.id, []]));
  for (const e of live) out.get(e.from).push(e.to);

  // Edges that close a cycle (an invalid flow in the editor) are drawn but do not layer.
  // Depth-first without recursion: a long chain must not overflow the stack.
  const back = new Set();
  const state = new Map();
  for (const n of nodes) {
    if (state.has(n.id)) continue;
    const stack = [[n.id, 0]];
    state.set(n.id, 1);
    while (stack.length) {
      const top = stack[stack.length - 1];
      const next = out.get(top[0])[top[1]++];
      if (next === undefined) { state.set(top[0], 2); stack.pop(); continue; }
      if (state.get(next) === 1) back.add(`${top[0]}\u0000${next}`);
      else if (!state.has(next)) { state.set(next, 1); stack.push([next, 0]); }
    }
  }
  const forward = live.filter((e) => !back.has(`${e.from}\u0000${e.to}`));

  // Longest path from the sources (Kahn's order over out-edge lists).
  const layer = new Map(nodes.map((n) => [n.id, 0]));
  const indegree = new Map(nodes.map((n) => [n.id, 0]));
  const next = new Map(nodes.map((n) => [n.id, []]));
  for (const e of forward) {
    indegree.set(e.to, indegree.get(e.to) + 1);
    next.get(e.from).push(e.to);
  }
  const ready = nodes.filter((n) => indegree.get(n.id) === 0).map((n) => n.id);
  for (let i = 0; i < ready.length; i++) {
    const id = ready[i];
    for (const to of next.get(id)) {
      layer.set(to, Math.max(layer.get(to), layer.get(id) + 1));
      indegree.set(to, indegree.get(to) - 1);
      if (indegree.get(to) === 0) ready.push(to);
    }
  }
  let spans = 0;
  for (const e of live) spans += Math.max(0, layer.get(e.to) - layer.get(e.from) - 1);
  if (spans > MAX_VIRTUAL) return null;

  // Virtual points on edges that span layers, so they route between nodes.
  const rows = [];
  const put = (v) => (rows[v.layer] ||= []).push(v);
  const vertex = new Map();
  for (const n of nodes) {
    const v = {id: n.id, layer: layer.get(n.id), real: true, up: [], down: []};
    vertex.set(n.id, v);
    put(v);
  }
  const routes = [];
  for (const e of live) {
    const a = vertex.get(e.from);
    const b = vertex.get(e.to);
    const chain = [a];
    if (a.layer < b.layer) {
      for (let l = a.layer + 1; l < b.layer; l++) {
        const v = {id: null, layer: l, real: false, up: [], down: []};
        put(v);
        chain.push(v);
      }
    }
    chain.push(b);
    for (let i = 0; i + 1 < chain.length; i++) {
      if (chain[i].layer < chain[i + 1].layer) {
        chain[i].down.push(chain[i + 1]);
        chain[i + 1].up.push(chain[i]);
      }
    }
    routes.push({edge: e, chain, back: a.layer >= b.layer});
  }
  for (const row of rows) if (row) row.forEach((v, i) => { v.pos = i; });

  // Barycenter sweeps, down then up.
  const mean = (list) => list.length ? list.reduce((t, v) => t + v.pos, 0) / list.length : null;
  for (let sweep = 0; sweep < 6; sweep++) {
    const down = sweep % 2 === 0;
    const order = down ? rows : [...rows].reverse();
    for (const row of order) {
      if (!row) continue;
      for (const v of row) {
        const m = mean(down ? v.up : v.down);
        v.key = m === null ? v.pos : m;
      }
      row.sort((a, b) => a.key - b.key || a.pos - b.pos);
      row.forEach((v, i) => { v.pos = i; });
    }
  }

  // Coordinates: rows centred, then each vertex pulled toward its neighbours' mean, keeping
  // order and spacing.
  const size = (v) => (v.real ? W : 12);
  for (const row of rows) {
    if (!row) continue;
    let x = 0;
    for (const v of row) { v.x = x + size(v) / 2; x += size(v) + GAP_X; }
  }
  for (let pass = 0; pass < 8; pass++) {
    const order = pass % 2 === 0 ? rows : [...rows].reverse();
    for (const row of order) {
      if (!row) continue;
      for (const v of row) {
        const near = [...v.up, ...v.down];
        if (near.length) v.want = near.reduce((t, n) => t + n.x, 0) / near.length;
        else v.want = v.x;
      }
      for (let i = 0; i < row.length; i++) {
        const v = row[i];
        const min = i ? row[i - 1].x + (size(row[i - 1]) + size(v)) / 2 + GAP_X : -Infinity;
        v.x = Math.max(min, v.want);
      }
      for (let i = row.length - 2; i >= 0; i--) {
        const v = row[i];
        const max = row[i + 1].x - (size(row[i + 1]) + size(v)) / 2 - GAP_X;
        if (v.x > max) v.x = max;
      }
    }
  }
  let left = Infinity;
  let right = -Infinity;
  for (const row of rows) for (const v of row || []) {
    left = Math.min(left, v.x - size(v) / 2);
    right = Math.max(right, v.x + size(v) / 2);
  }
  if (!Number.isFinite(left)) { left = 0; right = 0; }
  for (const row of rows) for (const v of row || []) {
    v.x += PAD - left;
    v.y = PAD + v.layer * (H + GAP_Y) + H / 2;
  }
  const width = right - left + 2 * PAD;
  const height = PAD * 2 + Math.max(1, rows.length) * (H + GAP_Y) - GAP_Y;
  const swap = direction === 'LR';
  const at = (v) => (swap ? {x: v.y * 1.6, y: v.x} : {x: v.x, y: v.y});
  return {
    width: swap ? height * 1.6 : width,
    height: swap ? width : height,
    swap,
    nodes: new Map([...vertex].map(([id, v]) => [id, at(v)])),
    routes: routes.map((r) => ({...r, points: r.chain.map(at)})),
  };
}

function path(points, swap, back) {
  const [a, ...rest] = points;
  const b = rest[rest.length - 1];
  const half = swap ? W * 0.8 : H / 2;
  const start = swap ? {x: a.x + half, y: a.y} : {x: a.x, y: a.y + half};
  const end = back
    ? (swap ? {x: b.x + half, y: b.y + H / 2} : {x: b.x + W / 2, y: b.y})
    : (swap ? {x: b.x - half, y: b.y} : {x: b.x, y: b.y - half});
  const all = [start, ...rest.slice(0, -1), end];
  let d = `M${start.x},${start.y}`;
  for (let i = 1; i < all.length; i++) {
    const p = all[i - 1];
    const q = all[i];
    if (swap) {
      const mx = (p.x + q.x) / 2;
      d += ` C${mx},${p.y} ${mx},${q.y} ${q.x},${q.y}`;
    } else {
      const my = (p.y + q.y) / 2;
      d += ` C${p.x},${my} ${q.x},${my} ${q.x},${q.y}`;
    }
  }
  return {d, label: all.length > 1 ? {x: (all[0].x + all[1].x) / 2, y: (all[0].y + all[1].y) / 2} : start};
}

/**
 * Draws a flow. `status(id)` gives a node's class (a step status, `problem`), `note(id)` a
 * short line under its type, `onSelect(id)` is called on click or Enter.
 */
export function draw(flow, {status, note, onSelect, selected, direction} = {}) {
  const nodes = Array.isArray(flow.nodes) ? flow.nodes.filter((n) => n && typeof n.id === 'string') : [];
  const edges = Array.isArray(flow.edges) ? flow.edges.filter((e) => e && typeof e.from === 'string') : [];
  const L = layout(nodes, edges, direction);
  if (!L) return tooLarge(nodes, status, onSelect);
  const w = L.swap ? W * 1.6 : W;
  const svg = s('svg', {
    class: 'dag', viewBox: `0 0 ${L.width + (L.swap ? W : 0)} ${L.height}`, role: 'group',
    'aria-label': 'the flow as a graph', width: L.width + (L.swap ? W : 0), height: L.height,
  });
  svg.append(s('defs', {}, s('marker', {
    id: 'arrow', viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7,
    orient: 'auto-start-reverse',
  }, s('path', {d: 'M0,0 L10,5 L0,10 z', class: 'arrowhead'}))));
  for (const r of L.routes) {
    const p = path(r.points, L.swap, r.back);
    const g = s('g', {class: `edge${r.edge.port ? ` port-${token(r.edge.port)}` : ''}`});
    g.append(s('path', {d: p.d, 'marker-end': 'url(#arrow)'}));
    if (r.edge.port) {
      g.append(s('text', {x: p.label.x + 4, y: p.label.y, class: 'port'}, r.edge.port));
    }
    svg.append(g);
  }
  const types = new Map(nodes.map((n) => [n.id, n.type]));
  for (const [id, at] of L.nodes) {
    const cls = status ? String(status(id) || '').split(' ').map(token).join(' ') : '';
    const g = s('g', {
      class: `node ${cls || ''}${selected === id ? ' selected' : ''}`, tabindex: 0, role: 'button',
      'data-node': id, transform: `translate(${at.x - w / 2},${at.y - H / 2})`,
      'aria-label': `${id} (${types.get(id) || 'node'})${cls ? `, ${cls}` : ''}`,
    });
    g.append(s('rect', {width: w, height: H, rx: 8}));
    g.append(s('text', {x: 12, y: 19, class: 'id'}, clip(id, 20)));
    g.append(s('text', {x: 12, y: 36, class: 'type'}, clip(note?.(id) || types.get(id) || '', 24)));
    g.append(s('title', {}, `${id}: ${types.get(id) || ''}${cls ? ` (${cls})` : ''}`));
    if (onSelect) {
      g.addEventListener('click', () => onSelect(id));
      g.addEventListener('keydown', (e) => {
        if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); onSelect(id); }
      });
    }
    svg.append(g);
  }
  return svg;
}

function clip(text, n) {
  const t = String(text);
  return t.length > n ? `${t.slice(0, n - 1)}…` : t;
}

/** A flow too large to draw, as a list of its nodes (with their status), still selectable. */
function tooLarge(nodes, status, onSelect) {
  return h('div', {class: 'toolarge'},
    h('p', {class: 'muted'}, `${nodes.length} nodes: too many to draw here (more than ${MAX_NODES} nodes, ${MAX_EDGES} edges, or edges spanning too many layers). Listed instead.`),
    h('ol', {}, nodes.slice(0, 5000).map((n) => h('li', {},
      onSelect ? h('button', {type: 'button', class: 'link', onclick: () => onSelect(n.id)}, n.id) : n.id,
      ' ', h('span', {class: 'muted'}, String(n.type || '')), ' ',
      status ? h('span', {class: `badge ${String(status(n.id) || '').split(' ').map(token).join(' ')}`}, String(status(n.id) || '').replace(/^s-/, '')) : null))));
}
