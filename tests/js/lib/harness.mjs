// What the JavaScript clients of the Rust integration tests share. A Rust
// test starts the API (`neurectomy_e2e::api::TestApi`), runs
// `node tests/js/<script>.mjs <base url> <token>` (`neurectomy_e2e::js`),
// reads the JSON lines the script prints on stdout, and asserts on them.
//
// The protocol: one JSON object per line on stdout, each with an `event`;
// the last one is `{"event": "result", ...}` (also when a step failed: then
// with `error`), and the exit code is 0 only if every step worked. Anything
// for humans goes to stderr.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

// `<base url> <token>` from the command line, e.g. `http://127.0.0.1:41234`.
export function target(argv = process.argv.slice(2)) {
  const [base, token] = argv;
  if (!base || !token) {
    console.error(`usage: node ${path.basename(process.argv[1])} <base url> <token>`);
    process.exit(2);
  }
  const url = new URL(base);
  return { url, token, origin: url.origin, host: url.host };
}

// Prints one JSON line on stdout for the Rust test.
export function emit(event, fields = {}) {
  process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);
}

// Lines of stdin (what the Rust test writes to the script), as an async
// iterator.
export function inputLines() {
  return readline.createInterface({ input: process.stdin, crlfDelay: Infinity })[
    Symbol.asyncIterator
  ]();
}

// Rejects with an error naming `what` when `promise` takes longer than `ms`.
export async function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// Polls `check` (async, returns a value or undefined) every 50 ms until it
// returns something, for at most `ms`.
export async function until(ms, what, check) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== null && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

// Debian's Chromium (`apt-get install chromium`); another binary with
// `NEURECTOMY_TEST_CHROMIUM`.
export const CHROMIUM = process.env.NEURECTOMY_TEST_CHROMIUM || '/usr/bin/chromium';

// Flags for a closed network and a root user: without the
// background-networking ones Chromium keeps trying to reach Google's hosts.
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

// Launches headless Chromium through playwright-core with a fresh profile
// (deleted by `close`). Returns `{ context, page, close }`.
export async function launchChromium() {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: apt-get install chromium (scripts/test.sh does)`);
  }
  const { chromium } = await import('playwright-core');
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'neurectomy-chromium-'));
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: { width: 1400, height: 900 },
    });
  } catch (e) {
    fs.rmSync(profile, { recursive: true, force: true });
    throw e;
  }
  const page = context.pages()[0] ?? (await context.newPage());
  const close = async () => {
    await context.close().catch(() => {});
    fs.rmSync(profile, { recursive: true, force: true });
  };
  return { context, page, close };
}
