// An auditor's verifier of one event, written from the README's "Sealed
// audit log" formats alone, with Node's built-ins (no code of ours): reads
// on stdin {"event": <an Event from eventLog/streamHistory>, "proof": <the
// AuditProof from auditProof>, "keys": <sealKeys>} and checks that the
// event is what the proof commits to, that the proof leads to the block
// root, and that the seal over that root is signed by a trusted key.
// Prints {"ok": true, ...} and exits 0, or {"ok": false, "why": ...} and
// exits 1.
import { createHash, createPublicKey, verify } from 'node:crypto';
import { readFileSync } from 'node:fs';

// RFC 8785: JSON.stringify already spells strings and numbers as JCS
// does; objects need their members sorted by UTF-16 code units (the
// default sort) and no whitespace.
function jcs(v) {
  if (v === null || typeof v !== 'object') return JSON.stringify(v);
  if (Array.isArray(v)) return '[' + v.map(jcs).join(',') + ']';
  return '{' + Object.keys(v).sort().map((k) => JSON.stringify(k) + ':' + jcs(v[k])).join(',') + '}';
}
const sha256 = (...parts) => {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest();
};
const hex = (b) => Buffer.from(b).toString('hex');
const leafHash = (bytes) => sha256(Buffer.from([0]), Buffer.from(bytes, 'utf8'));
const nodeHash = (l, r) => sha256(Buffer.from([1]), l, r);
const fieldDigest = (event, field, value) =>
  'sha256:' + hex(sha256(jcs({ event, field, value })));

// RFC 9162 §2.1.3.2: the root an inclusion proof gives.
function rootFromPath(leaf, index, size, path) {
  if (index >= size) throw new Error(`index ${index} not below size ${size}`);
  let fn = index, sn = size - 1, r = leaf;
  for (const p of path.map((x) => Buffer.from(x, 'hex'))) {
    if (sn === 0) throw new Error('proof too long');
    if ((fn & 1) === 1 || fn === sn) {
      r = nodeHash(p, r);
      if ((fn & 1) === 0) while ((fn & 1) === 0 && fn !== 0) { fn >>= 1; sn >>= 1; }
    } else {
      r = nodeHash(r, p);
    }
    fn >>= 1; sn >>= 1;
  }
  if (sn !== 0) throw new Error('proof too short');
  return r;
}

const same = (a, b) => jcs(a) === jcs(b);

function check({ event, proof, keys }) {
  const c = proof.committed;
  const m = event.metadata;
  const why = (what) => { throw new Error(what); };
  if (proof.state !== 'SEALED') why(`the event is ${proof.state}`);
  // The event as the API shows it is what the leaf commits to.
  if (c.event !== m.eventId) why('not this event');
  if (String(c.position) !== String(event.position)) why('another position');
  if (c.stream !== event.streamId || c.version !== event.version) why('another stream or version');
  if (c.type !== event.type || c.schema !== event.schemaVersion) why('another type or schema');
  const data = event.data, cd = c.committedData;
  if (!same(Object.keys(data).sort(), Object.keys(cd).sort())) why('other data fields');
  for (const k of Object.keys(data)) {
    if (!same(cd[k], data[k]) && cd[k] !== fieldDigest(c.event, k, data[k])) why(`data field ${k} differs`);
  }
  const cm = c.committedMetadata;
  // An erased actor is shown as its digest: the committed value itself.
  if (cm.actor !== m.actor && cm.actor !== fieldDigest(c.event, 'actor', m.actor)) why('the actor differs');
  for (const [k, v] of [['event_id', m.eventId], ['command_id', m.commandId], ['command_type', m.commandType],
    ['correlation_id', m.correlationId], ['causation_id', m.causationId], ['traceparent', m.traceparent ?? null]]) {
    if (cm[k] !== v) why(`metadata ${k} differs`);
  }
  if (c.correlation !== m.correlationId || c.command !== m.commandId) why('ids differ');
  if (Date.parse(cm.occurred_at) !== Date.parse(m.occurredAt)) why('occurred_at differs');
  if (Date.parse(c.recorded_at) !== Date.parse(m.recordedAt)) why('recorded_at differs');
  // The leaf, and the paths to the block root.
  const leaf = jcs({
    command: c.command, correlation: c.correlation, data: hex(sha256(jcs(cd))), event: c.event,
    metadata: hex(sha256(jcs(cm))), position: c.position, recorded_at: c.recorded_at,
    schema: c.schema, stream: c.stream, tenant: c.tenant, type: c.type, v: 1, version: c.version,
  });
  if (leaf !== proof.leaf) why('the leaf re-derived differs from the proof\'s');
  const tenantRoot = rootFromPath(leafHash(leaf), proof.index, proof.count, proof.tenantPath);
  const tenantLeaf = jcs({ count: proof.count, root: hex(tenantRoot), tenant: c.tenant });
  const blockRoot = rootFromPath(leafHash(tenantLeaf), proof.tenantIndex, proof.tenants, proof.blockPath);
  // The seal: canonical, over that root, signed by a trusted key.
  const seal = proof.seal;
  const body = JSON.parse(seal.body);
  if (jcs(body) !== seal.body) why('the seal body is not canonical');
  if (body.root !== hex(blockRoot)) why('the proof does not lead to the signed root');
  if (!(BigInt(body.first) <= BigInt(c.position) && BigInt(c.position) <= BigInt(body.last))) why('outside the seal');
  const key = keys.find((k) => k.id === body.key);
  if (!key) why(`the seal's key ${body.key} is not trusted`);
  const raw = Buffer.from(key.publicKey, 'base64');
  if ('ed25519:' + hex(sha256(raw)).slice(0, 16) !== key.id) why('the key id is not its key\'s');
  const spki = Buffer.concat([Buffer.from('302a300506032b6570032100', 'hex'), raw]);
  const pub = createPublicKey({ key: spki, format: 'der', type: 'spki' });
  if (!verify(null, Buffer.from(seal.body, 'utf8'), pub, Buffer.from(seal.signature, 'base64'))) why('bad signature');
  return { ok: true, seal: body.seq, root: body.root, key: body.key };
}

try {
  console.log(JSON.stringify(check(JSON.parse(readFileSync(0, 'utf8')))));
} catch (e) {
  console.log(JSON.stringify({ ok: false, why: e.message }));
  process.exit(1);
}
