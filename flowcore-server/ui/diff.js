// A line diff of two texts (the longest common subsequence), for flow versions. Flows are
// tens to hundreds of lines; the table is bounded so a huge flow cannot freeze the tab.

const MAX_CELLS = 4_000_000;

/** `[{op: ' ' | '-' | '+', line}]` from `a` to `b`. */
export function diffLines(a, b) {
  const x = a.split('\n');
  const y = b.split('\n');
  // Lines as numbers: the table compares integers, not long strings.
  const ids = new Map();
  const num = (line) => { if (!ids.has(line)) ids.set(line, ids.size); return ids.get(line); };
  const xi = Int32Array.from(x, num);
  const yi = Int32Array.from(y, num);
  if (x.length * y.length > MAX_CELLS) {
    return [...x.map((line) => ({op: '-', line})), ...y.map((line) => ({op: '+', line}))];
  }
  const n = x.length;
  const m = y.length;
  const table = Array.from({length: n + 1}, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      table[i][j] = xi[i] === yi[j] ? table[i + 1][j + 1] + 1 : Math.max(table[i + 1][j], table[i][j + 1]);
    }
  }
  const out = [];
  let i = 0;
  let j = 0;
  while (i < n && j < m) {
    if (xi[i] === yi[j]) { out.push({op: ' ', line: x[i]}); i++; j++; }
    else if (table[i + 1][j] >= table[i][j + 1]) out.push({op: '-', line: x[i++]});
    else out.push({op: '+', line: y[j++]});
  }
  while (i < n) out.push({op: '-', line: x[i++]});
  while (j < m) out.push({op: '+', line: y[j++]});
  return out;
}
