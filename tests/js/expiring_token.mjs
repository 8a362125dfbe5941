// A dashboard with short-lived tokens, as graphql-ws clients are written:
// `connectionParams` is a function that mints a fresh token each time the
// client connects, and the subscription's variables carry `afterPosition` =
// the last position received, so that when the server closes the socket
// because the token expired (4403, which graphql-ws retries), the client
// reconnects with a new token and resubscribes where it stopped.
//
//   node expiring_token.mjs <base url> <unused token>
//   env: NEURECTOMY_TEST_JWT_SECRET (HS256), NEURECTOMY_TEST_TENANT,
//        NEURECTOMY_TEST_TOKEN_SECONDS (how long each token is accepted),
//        NEURECTOMY_TEST_AFTER (the position to start after)
//
// Prints `subscribed`, then `closed` {code, reason} for every close, and,
// once the Rust test writes `until <position>` on stdin and the client has
// received that position, `result` {positions, closes, connects}.
import crypto from 'node:crypto';
import { createClient } from 'graphql-ws';
import WebSocket from 'ws';
import { emit, inputLines, target, within } from './lib/harness.mjs';

const { url } = target();
const secret = process.env.NEURECTOMY_TEST_JWT_SECRET;
const tenant = process.env.NEURECTOMY_TEST_TENANT;
const seconds = Number(process.env.NEURECTOMY_TEST_TOKEN_SECONDS || '2');
const after = process.env.NEURECTOMY_TEST_AFTER || '0';
// The server accepts a token until 5 s (its leeway) after its `exp`.
const LEEWAY = 5;

function base64url(value) {
  return Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString(
    'base64url',
  );
}

// An HS256 JWT accepted for `seconds` more seconds.
function mint() {
  const now = Math.floor(Date.now() / 1000);
  const header = base64url({ alg: 'HS256', typ: 'JWT' });
  const claims = base64url({
    sub: 'dashboard',
    tenant,
    roles: ['viewer'],
    iat: now,
    exp: now + seconds - LEEWAY,
  });
  const signature = crypto
    .createHmac('sha256', secret)
    .update(`${header}.${claims}`)
    .digest('base64url');
  return `${header}.${claims}.${signature}`;
}

const positions = [];
const closes = [];
let connects = 0;
let failure = null;

const client = createClient({
  url: `ws://${url.host}/graphql/ws`,
  webSocketImpl: WebSocket,
  connectionParams: () => {
    connects += 1;
    return { authorization: `Bearer ${mint()}` };
  },
  retryAttempts: 20,
  // Reconnect soon (the default waits 1–4 s and more); what matters here
  // is that the client comes back, not how patiently.
  retryWait: () => new Promise((resolve) => setTimeout(resolve, 200)),
  on: {
    closed: (event) => {
      closes.push({ code: event.code, reason: event.reason });
      emit('closed', { code: event.code, reason: event.reason });
    },
  },
});

// The payload object is sent again on every reconnect: its `after`
// variable is the last position received.
const payload = {
  query:
    'subscription($after: Position) { events(afterPosition: $after) { position type streamId } }',
  variables: { after },
};
let wanted = null;
let reached;
const done = new Promise((resolve) => {
  reached = resolve;
});
client.subscribe(payload, {
  next: (result) => {
    if (result.errors) {
      failure = `errors in a next: ${JSON.stringify(result.errors)}`;
      reached();
      return;
    }
    const position = result.data.events.position;
    positions.push(position);
    payload.variables.after = position;
    if (wanted !== null && BigInt(position) >= wanted) reached();
  },
  error: (error) => {
    failure = `the subscription failed: ${JSON.stringify(error?.message ?? error)}`;
    reached();
  },
  complete: () => {
    failure = failure ?? 'the subscription completed';
    reached();
  },
});
emit('subscribed');

try {
  for await (const line of inputLines()) {
    const [command, value] = line.trim().split(/\s+/);
    if (command !== 'until') continue;
    wanted = BigInt(value);
    const last = positions.at(-1);
    if (last !== undefined && BigInt(last) >= wanted) reached();
    await within(60_000, `the event at position ${value}`, done);
    break;
  }
} catch (error) {
  failure = failure ?? String(error);
}
client.dispose();
emit('result', { positions, closes, connects, error: failure });
process.exit(failure ? 1 : 0);
