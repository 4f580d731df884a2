// Runs: the list with filters and paging, and a run's page: its DAG coloured by step status
// and kept live over Server-Sent Events, each step's definition, output, error, attempts and
// timing, a timeline, the tokens of LLM steps as they stream, and the actions (cancel, rerun,
// signal a waiting run).

import {get, post, runEvents, ApiError} from './api.js';
import {h, fill, json, badge, time, duration, route, debounce} from './dom.js';
import {draw} from './dag.js';

const enc = encodeURIComponent;
const STATUSES = ['queued', 'running', 'waiting', 'succeeded', 'failed', 'cancelled', 'timed_out'];
const FINAL = new Set(['succeeded', 'failed', 'cancelled', 'timed_out']);
const TOKEN_TEXT_LIMIT = 200_000;

/** A `datetime-local` value as RFC 3339 in UTC. */
const utc = (local) => (local ? new Date(local).toISOString() : null);
const local = (iso) => {
  const d = new Date(iso || NaN);
  if (Number.isNaN(d.getTime())) return '';
  return new Date(d - d.getTimezoneOffset() * 60_000).toISOString().slice(0, 16);
};

export async function runsPage(main, q, signal) {
  const filter = {
    flow_id: q.get('flow_id'), status: q.get('status'),
    created_after: q.get('created_after'), created_before: q.get('created_before'),
  };
  const page = await get(route('/runs', {...filter, limit: 50, cursor: q.get('cursor')}));
  if (signal.aborted) return;
  const field = (name, label, control) => h('label', {}, h('span', {}, label), control);
  const form = h('form', {class: 'filters', onsubmit: (e) => {
    e.preventDefault();
    const data = new FormData(form);
    location.hash = route('#/runs', {
      flow_id: data.get('flow_id').trim(), status: data.get('status'),
      created_after: utc(data.get('created_after')), created_before: utc(data.get('created_before')),
    });
  }},
  field('flow_id', 'Flow', h('input', {name: 'flow_id', value: filter.flow_id || '', placeholder: 'any'})),
  field('status', 'Status', h('select', {name: 'status'}, h('option', {value: ''}, 'any'),
    STATUSES.map((st) => h('option', {value: st, selected: st === filter.status}, st)))),
  field('created_after', 'From', h('input', {type: 'datetime-local', name: 'created_after', value: local(filter.created_after)})),
  field('created_before', 'To', h('input', {type: 'datetime-local', name: 'created_before', value: local(filter.created_before)})),
  h('button', {type: 'submit'}, 'Filter'),
  h('a', {class: 'button quiet', href: '#/runs'}, 'Clear'));
  const back = q.get('cursor') ? h('a', {href: route('#/runs', filter)}, '← First page') : null;
  fill(main,
    h('div', {class: 'bar'}, h('h1', {}, 'Runs')), form,
    page.items.length
      ? h('table', {class: 'list'},
        h('thead', {}, h('tr', {}, ['Run', 'Flow', 'Status', 'Created', 'Duration']
          .map((t) => h('th', {scope: 'col'}, t)))),
        h('tbody', {}, page.items.map((r) => h('tr', {},
          h('td', {class: 'mono'}, h('a', {href: `#/runs/${enc(r.id)}`}, r.id)),
          h('td', {}, h('a', {href: `#/flows/${enc(r.flow_id)}`}, r.flow_id), h('span', {class: 'muted'}, ` v${r.flow_version}`)),
          h('td', {}, badge(r.status), r.rerun_of ? h('span', {class: 'muted'}, ' rerun') : null,
            r.data_pruned ? h('span', {class: 'muted'}, ' data pruned') : null),
          h('td', {}, time(r.created_at)),
          h('td', {class: 'num'}, r.finished_at ? duration(r.created_at, r.finished_at) : '—')))))
      : h('div', {class: 'card empty'}, h('p', {}, 'No run matches.')),
    h('p', {class: 'pager'}, back,
      page.next_cursor ? h('a', {href: route('#/runs', {...filter, cursor: page.next_cursor})}, 'Next page →') : null));
}

export async function runPage(main, id, q, signal) {
  let run = await get(`/runs/${enc(id)}`);
  const flow = await get(route(`/flows/${enc(run.flow_id)}`, {version: run.flow_version}))
    .catch(() => null);
  if (signal.aborted) return;
  const def = flow?.definition || {nodes: run.steps.map((st) => ({id: st.node, type: ''})), edges: []};
  const nodes = new Map((def.nodes || []).map((n) => [n.id, n]));
  // Live state the run record does not hold: a node started but not yet recorded, and the
  // streamed text of LLM steps by node.
  const live = new Map();
  const tokens = new Map();
  let selected = q.get('node') || null;

  const head = h('div', {class: 'bar'});
  const summary = h('dl', {class: 'facts'});
  const actions = h('div', {class: 'actions'});
  const graph = h('div', {class: 'graph'});
  const detail = h('aside', {class: 'detail card', 'aria-live': 'polite'});
  const timeline = h('div', {class: 'timeline'});
  const io = h('div', {class: 'io'});
  const notice = h('p', {role: 'status', class: 'muted'});

  let steps = new Map(run.steps.map((st) => [st.node, st]));
  const step = (nodeId) => steps.get(nodeId);
  const statusOf = (nodeId) => live.get(nodeId) || step(nodeId)?.status || 'pending';

  const renderHead = () => {
    fill(head, h('h1', {}, 'Run'), h('span', {class: 'mono'}, run.id), badge(run.status),
      run.archived ? h('span', {class: 'muted'}, 'archived') : null);
    fill(summary,
      h('dt', {}, 'Flow'), h('dd', {}, h('a', {href: `#/flows/${enc(run.flow_id)}`}, run.flow_id), ` v${run.flow_version}`),
      h('dt', {}, 'Created'), h('dd', {}, time(run.created_at)),
      h('dt', {}, 'Started'), h('dd', {}, time(run.started_at)),
      h('dt', {}, 'Finished'), h('dd', {}, time(run.finished_at)),
      h('dt', {}, 'Duration'), h('dd', {}, run.started_at ? duration(run.started_at, run.finished_at) : '—'),
      run.rerun_of ? [h('dt', {}, 'Rerun of'), h('dd', {}, h('a', {href: `#/runs/${enc(run.rerun_of)}`, class: 'mono'}, run.rerun_of))] : null,
      run.concurrency_key ? [h('dt', {}, 'Concurrency key'), h('dd', {class: 'mono'}, run.concurrency_key)] : null,
      run.error ? [h('dt', {}, 'Error'), h('dd', {class: 'error'}, run.error)] : null);
  };

  const renderGraph = () => fill(graph, draw(def, {
    status: (nodeId) => `s-${statusOf(nodeId)}`,
    note: (nodeId) => {
      const st = step(nodeId);
      const type = nodes.get(nodeId)?.type || '';
      if (st?.items_total !== undefined) return `${type} · ${st.items_done ?? 0}/${st.items_total} items`;
      if (st?.reused) return `${type} · reused`;
      if (st?.started_at && st?.finished_at) return `${type} · ${duration(st.started_at, st.finished_at)}`;
      return type;
    },
    onSelect: (nodeId) => { selected = nodeId; renderGraph(); renderDetail(); },
    selected,
  }));

  const renderDetail = () => {
    if (!selected) {
      fill(detail, h('p', {class: 'muted'}, 'Select a step to see its params, output and error.'));
      return;
    }
    const st = step(selected) || {node: selected, status: statusOf(selected), attempts: 0};
    const n = nodes.get(selected);
    const streamed = tokens.get(selected);
    fill(detail,
      h('h2', {}, selected), h('p', {}, badge(statusOf(selected)), ' ', h('span', {class: 'muted'}, n?.type || '')),
      h('dl', {class: 'facts'},
        h('dt', {}, 'Attempts'), h('dd', {}, String(st.attempts ?? 0)),
        h('dt', {}, 'Started'), h('dd', {}, time(st.started_at)),
        h('dt', {}, 'Finished'), h('dd', {}, time(st.finished_at)),
        h('dt', {}, 'Took'), h('dd', {}, st.started_at ? duration(st.started_at, st.finished_at) : '—'),
        st.items_total !== undefined ? [h('dt', {}, 'Items'), h('dd', {}, `${st.items_done ?? 0} of ${st.items_total} done`)] : null,
        st.reused ? [h('dt', {}, 'Reused'), h('dd', {}, 'kept from the run this one reruns')] : null),
      st.error ? [h('h3', {}, 'Error'), h('pre', {class: 'error'}, st.error),
        st.error_code ? h('p', {class: 'muted'}, `code: ${st.error_code}`) : null] : null,
      streamed ? [h('h3', {}, 'Tokens'), h('pre', {class: 'tokens', 'data-node': selected}, streamed.text),
        streamed.cut ? h('p', {class: 'muted'}, `The first ${TOKEN_TEXT_LIMIT.toLocaleString()} characters; the output has the whole answer.`) : null] : null,
      st.output !== undefined && st.output !== null ? [h('h3', {}, 'Output'), json(st.output)] : null,
      n ? [h('h3', {}, 'Params (as defined in the flow)'), json(n.params || {})] : null,
      FINAL.has(run.status) && !run.data_pruned
        ? h('button', {type: 'button', class: 'quiet', onclick: () => rerun(selected)}, `Rerun from ${selected}`)
        : null);
  };

  const renderTimeline = () => {
    const timed = run.steps.filter((st) => st.started_at);
    if (!timed.length) { fill(timeline, h('p', {class: 'muted'}, 'No step has started yet.')); return; }
    const t0 = Math.min(...timed.map((st) => Date.parse(st.started_at)));
    const end = (st) => (st.finished_at ? Date.parse(st.finished_at) : Date.now());
    const t1 = Math.max(...timed.map(end), t0 + 1);
    const span = t1 - t0;
    fill(timeline, h('h2', {}, 'Timeline'), h('p', {class: 'muted'}, `${duration(new Date(t0).toISOString(), new Date(t1).toISOString())} from the first step to the last`),
      h('ol', {class: 'gantt'}, timed.sort((a, b) => Date.parse(a.started_at) - Date.parse(b.started_at)).map((st) => {
        const left = ((Date.parse(st.started_at) - t0) / span) * 100;
        const width = Math.max(0.6, ((end(st) - Date.parse(st.started_at)) / span) * 100);
        const bar = h('span', {class: `bar-fill s-${st.status}`});
        bar.style.marginLeft = `${left}%`;
        bar.style.width = `${Math.min(width, 100 - left)}%`;
        const label = st.items_total !== undefined ? `${st.node} (${st.items_total} items)` : st.node;
        return h('li', {},
          h('button', {type: 'button', class: 'link', onclick: () => { selected = st.node; renderGraph(); renderDetail(); }}, label),
          h('span', {class: 'track', title: `${st.node}: ${duration(st.started_at, st.finished_at)}`}, bar),
          h('span', {class: 'num muted'}, duration(st.started_at, st.finished_at)));
      })));
  };

  const renderIo = () => fill(io,
    run.data_pruned ? h('p', {class: 'muted'}, 'Retention removed this run\'s data; its summary is kept.') : null,
    h('h2', {}, 'Input'), json(run.input),
    run.output !== undefined && run.output !== null ? [h('h2', {}, 'Output'), json(run.output)] : null,
    run.actions?.length ? [h('h2', {}, 'Actions'), h('ul', {}, run.actions.map((a) =>
      h('li', {}, time(a.at), ' ', a.action, a.actor ? ` by ${a.actor.name || a.actor.id}` : '',
        a.detail ? h('span', {class: 'muted'}, ` ${typeof a.detail === 'string' ? a.detail : JSON.stringify(a.detail)}`) : null)))] : null);

  const act = async (what, fn) => {
    fill(notice, `${what}…`);
    try {
      const answer = await fn();
      fill(notice, `${what}: done.`);
      return answer;
    } catch (err) {
      fill(notice, h('span', {class: 'error'}, `${what}: ${err.code}: ${err.message}`));
      return null;
    }
  };

  const rerun = async (from) => {
    const answer = await act('Rerun', () => post(`/runs/${enc(run.id)}/rerun`, {from, version: rerunVersion.value}));
    if (answer) location.hash = `#/runs/${enc(answer.run_id)}`;
  };
  const rerunVersion = h('select', {'aria-label': 'version to rerun'},
    h('option', {value: 'original'}, 'its version'), h('option', {value: 'latest'}, 'the latest version'));

  // Drawn again only when what they act on changed: a signal's body being typed survives
  // the re-reads that events cause.
  let actionsDrawn = null;
  const renderActions = () => {
    const drawn = JSON.stringify([run.status, run.waits, run.data_pruned, run.steps.map((st) => st.status)]);
    if (drawn === actionsDrawn) return;
    actionsDrawn = drawn;
    const parts = [];
    if (!FINAL.has(run.status)) {
      parts.push(h('button', {type: 'button', class: 'danger', onclick: async () => {
        if (await act('Cancel', () => post(`/runs/${enc(run.id)}/cancel`))) refresh();
      }}, 'Cancel'));
    } else if (!run.data_pruned) {
      const failed = run.steps.some((st) => st.status === 'failed');
      parts.push(h('button', {type: 'button', onclick: () => rerun(failed ? 'failed' : 'start')},
        failed ? 'Rerun failed steps' : 'Rerun'), ' with ', rerunVersion);
    }
    for (const w of run.waits || []) {
      if (!w.signal) {
        parts.push(h('p', {class: 'muted'}, `${w.node} sleeps until `, time(w.deadline)));
        continue;
      }
      const area = h('textarea', {class: 'editor small', rows: 3, 'aria-label': `the ${w.signal} signal's body`, spellcheck: 'false'});
      area.value = '{"approved": true}';
      parts.push(h('form', {class: 'card signal', onsubmit: async (e) => {
        e.preventDefault();
        let body;
        try { body = JSON.parse(area.value); } catch (err) { fill(notice, h('span', {class: 'error'}, `JSON: ${err.message}`)); return; }
        if (await act(`Signal ${w.signal}`, () => post(`/runs/${enc(run.id)}/signals/${enc(w.signal)}`, body))) refresh();
      }}, h('h3', {}, `${w.node} waits for the signal "${w.signal}"`),
      w.key ? h('p', {class: 'muted'}, `key ${w.key}`) : null,
      h('p', {class: 'muted'}, 'until ', time(w.deadline)), area,
      h('button', {type: 'submit'}, `Send ${w.signal}`)));
    }
    fill(actions, parts);
  };

  const render = () => { renderHead(); renderGraph(); renderDetail(); renderTimeline(); renderIo(); renderActions(); };
  const refresh = async () => {
    try {
      run = await get(`/runs/${enc(id)}`);
      steps = new Map(run.steps.map((st) => [st.node, st]));
      for (const [nodeId] of live) if (step(nodeId) && step(nodeId).status !== 'pending') live.delete(nodeId);
      render();
    } catch (err) {
      if (err.name !== 'AbortError') fill(notice, h('span', {class: 'error'}, err.message));
    }
  };
  const later = debounce(refresh, 200);

  fill(main, head, summary, actions, notice,
    h('div', {class: 'split'}, graph, detail), timeline, io);
  render();

  // Live: events move the graph (once a frame at most), and the record is re-read shortly
  // after to show outputs and timings. A stream that drops is resumed after its last event,
  // waiting longer after each failure (1 s to 30 s, with jitter); any event resets the wait.
  let framed = false;
  const redraw = () => {
    if (framed) return;
    framed = true;
    requestAnimationFrame(() => { framed = false; renderGraph(); });
  };
  const addTokens = (d) => {
    if (typeof d.delta !== 'string' || typeof d.node !== 'string') return;
    const t = tokens.get(d.node) || {text: '', cut: false};
    if (!tokens.has(d.node)) tokens.set(d.node, t);
    const room = TOKEN_TEXT_LIMIT - t.text.length;
    const piece = d.delta.slice(0, Math.max(0, room));
    if (piece.length < d.delta.length) t.cut = true;
    if (!piece) return;
    t.text += piece;
    if (selected !== d.node) return;
    const pre = detail.querySelector('pre.tokens');
    // Appended, not rewritten: a long answer costs each token once.
    if (pre) pre.append(piece); else renderDetail();
  };
  let last = null;
  let failures = 0;
  while (!FINAL.has(run.status) && !signal.aborted && failures < 50) {
    let wait = 0;
    try {
      for await (const ev of runEvents(run.id, last, signal)) {
        failures = 0;
        if (ev.id) last = ev.id;
        const d = ev.data || {};
        if (ev.event === 'node_started') { live.set(d.node, 'running'); redraw(); }
        else if (ev.event === 'node_finished') { live.set(d.node, d.status); redraw(); later(); }
        else if (ev.event === 'token') addTokens(d);
        else if (ev.event === 'reset') { last = null; await refresh(); }
        else later();
      }
    } catch (err) {
      if (err.name === 'AbortError' || signal.aborted) return;
      if (err instanceof ApiError && err.status < 500 && err.status !== 429) { fill(notice, err.message); return; }
      failures++;
      wait = Math.min(30_000, 1000 * 2 ** Math.min(failures, 5)) * (0.5 + Math.random() / 2);
      fill(notice, `Live updates paused (${err.message}); trying again in ${Math.round(wait / 1000)} s.`);
    }
    await refresh();
    if (!FINAL.has(run.status) && !signal.aborted) {
      // A stream that ended without the run's end (the server restarted, a proxy cut it).
      await new Promise((r) => setTimeout(r, wait || 1000));
    }
  }
  if (failures >= 50) fill(notice, 'Live updates stopped: reload the page to try again.');
}
