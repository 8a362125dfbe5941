// GraphiQL in a real browser: Debian's headless Chromium, driven by
// playwright-core, opens `<base url>/?token=<token>` and uses GraphiQL as a
// person would. Run by tests/tests/e2e/browser.rs:
//
//   node tests/js/graphiql.mjs http://127.0.0.1:<port> <viewer token>
//
// Steps, each recorded in the result whether it worked or not:
//   load          the page and GraphiQL's editor render;
//   docs          the Documentation Explorer lists the schema's root types;
//   dialog        the settings dialog opens and closes (GraphiQL's one inline
//                 style, which the page's CSP allows by nonce);
//   query         `{ projectionStatus { name head } }` typed into the editor
//                 and run returns data;
//   subscription  `agentsUpdated(afterPosition: <head>)` typed and run; the
//                 script prints `{"event": "subscribed"}` once the subscribe
//                 message is on the socket, the Rust test registers an agent,
//                 and the result pane must show it; then the subscription is
//                 stopped.
// Throughout: every request the page makes (documents, scripts, styles,
// fetches, WebSockets) with its host and status, Content-Security-Policy
// violations, page errors and console errors; the token is replaced by
// `<token>` in what is printed.
import { emit, launchChromium, target, until } from './lib/harness.mjs';

const { url, token, host } = target();
const STEP_MS = 30_000;

const redact = (text) => String(text).split(token).join('<token>');

const result = {
  requests: [],
  offHost: [],
  failed: [],
  sockets: [],
  cspViolations: [],
  pageErrors: [],
  consoleErrors: [],
  steps: {},
};
const frames = { sent: [], received: [] };

// Whether a request stays on the server under test.
function onHost(address) {
  const u = new URL(address);
  if (u.protocol === 'data:') return true;
  return ['http:', 'ws:'].includes(u.protocol) && u.host === host;
}

function watch(context, page) {
  context.on('request', (request) => {
    const address = request.url();
    if (address.startsWith('data:')) return;
    const authorization = request.headers().authorization;
    result.requests.push({
      method: request.method(),
      url: redact(address),
      type: request.resourceType(),
      // whether it carried the page's token (only GraphQL requests should)
      authorization: authorization === undefined ? 'none' : authorization === `Bearer ${token}` ? 'token' : 'other',
    });
    if (!onHost(address)) result.offHost.push(redact(address));
  });
  context.on('requestfailed', (request) => {
    if (request.url().startsWith('data:')) return;
    result.failed.push({ url: redact(request.url()), error: request.failure()?.errorText });
  });
  context.on('response', (response) => {
    if (response.status() >= 400) {
      result.failed.push({ url: redact(response.url()), status: response.status() });
    }
  });
  page.on('websocket', (socket) => {
    result.sockets.push(redact(socket.url()));
    if (!onHost(socket.url())) result.offHost.push(redact(socket.url()));
    const parse = (payload) => {
      try {
        return JSON.parse(payload);
      } catch {
        return { type: '(not JSON)' };
      }
    };
    socket.on('framesent', ({ payload }) => frames.sent.push(parse(payload)));
    socket.on('framereceived', ({ payload }) => frames.received.push(parse(payload)));
  });
  page.on('pageerror', (error) => result.pageErrors.push(redact(error.message)));
  page.on('console', (message) => {
    if (message.type() === 'error') result.consoleErrors.push(redact(message.text()));
  });
}

const QUERY_EDITOR = '.graphiql-query-editor .CodeMirror';
const RESPONSE = '.graphiql-response .CodeMirror';

// Replaces the query editor's text by typing `text`, an operation of
// `kind`, into it, and waits until GraphiQL has parsed it (it does so a
// moment after the edit; it picks the transport, HTTP or the socket, from
// the parsed operation when the operation is run).
async function type(page, text, kind) {
  await page.locator(QUERY_EDITOR).click();
  await page.keyboard.press('Control+A');
  await page.keyboard.press('Delete');
  // insertText types the text as input (no key events, so the editor's
  // bracket completion does not add a second `}`).
  await page.keyboard.insertText(text);
  const held = await page.evaluate(
    (selector) => document.querySelector(selector).CodeMirror.getValue(),
    QUERY_EDITOR,
  );
  if (held !== text) throw new Error(`the editor holds ${JSON.stringify(held)} after typing`);
  await until(STEP_MS, `GraphiQL to parse the ${kind}`, () =>
    page.evaluate(
      ([selector, kind]) => {
        const operations = document.querySelector(selector).CodeMirror.operations;
        return operations?.length === 1 && operations[0].operation === kind;
      },
      [QUERY_EDITOR, kind],
    ),
  );
}

// The response pane's text.
function responseText(page) {
  return page.evaluate(
    (selector) => document.querySelector(selector)?.CodeMirror.getValue() ?? '',
    RESPONSE,
  );
}

// Runs the editor's operation; returns the response pane's JSON once it is
// no longer what it was before and `accept` takes it.
async function run(page, what, accept) {
  const before = await responseText(page);
  await page.locator('.graphiql-execute-button').click();
  return until(STEP_MS, what, async () => {
    const text = await responseText(page);
    if (text === before) return undefined;
    try {
      const body = JSON.parse(text);
      return accept(body) ? body : undefined;
    } catch {
      return undefined;
    }
  });
}

async function step(name, run) {
  try {
    result.steps[name] = { ok: true, ...(await run()) };
  } catch (e) {
    result.steps[name] = { ok: false, error: redact(e.message) };
  }
  return result.steps[name];
}

let browser;
let status = 0;
try {
  browser = await launchChromium();
  const { context, page } = browser;
  await context.addInitScript(() => {
    window.__violations = [];
    document.addEventListener('securitypolicyviolation', (e) =>
      window.__violations.push({
        directive: e.violatedDirective,
        blocked: e.blockedURI,
        source: e.sourceFile,
        line: e.lineNumber,
      }),
    );
  });
  watch(context, page);

  const load = await step('load', async () => {
    const address = new URL(url);
    address.searchParams.set('token', token);
    const document = await page.goto(address.href, { waitUntil: 'load', timeout: STEP_MS });
    await page.locator(QUERY_EDITOR).waitFor({ timeout: STEP_MS });
    return {
      status: document.status(),
      contentSecurityPolicy: document.headers()['content-security-policy'] ?? null,
      title: await page.title(),
      executeButton: await page.locator('.graphiql-execute-button').isVisible(),
    };
  });

  if (load.ok) {
    await step('docs', async () => {
      await page.locator('.graphiql-sidebar button[aria-label*="Documentation Explorer"]').click();
      const outcome = await until(STEP_MS, 'the Documentation Explorer', async () => {
        // Each root type's line: `query: Query`.
        const roots = await page
          .locator('.graphiql-doc-explorer-root-type')
          .evaluateAll((labels) => labels.map((label) => label.parentElement.innerText));
        if (roots.length > 0) return { roots };
        const error = page.locator('.graphiql-doc-explorer-error');
        if ((await error.count()) > 0) return { error: await error.first().innerText() };
        return undefined;
      });
      if (outcome.error) throw new Error(`the Documentation Explorer shows: ${outcome.error}`);
      return { rootTypes: outcome.roots.map((t) => t.replace(/\s+/g, ' ').trim()) };
    });

    // A dialog (a portal, with scroll locking and focus trapping).
    await step('dialog', async () => {
      await page.locator('button[aria-label="Open settings dialog"]').click();
      const dialog = page.locator('[role="dialog"]');
      await dialog.waitFor({ timeout: STEP_MS });
      const text = (await dialog.innerText()).replace(/\s+/g, ' ').trim();
      await page.keyboard.press('Escape');
      await dialog.waitFor({ state: 'detached', timeout: STEP_MS });
      return { text: text.slice(0, 80) };
    });

    const query = await step('query', async () => {
      const text = '{ projectionStatus { name head } }';
      await type(page, text, 'query');
      const body = await run(page, 'the query result', (b) => b.data || b.errors);
      const request = result.requests.find((r) => r.method === 'POST' && r.url.endsWith('/graphql'));
      return { typed: text, response: body, postedTo: request?.url ?? null };
    });

    if (query.ok && query.response.data) {
      await step('subscription', async () => {
        const head = query.response.data.projectionStatus[0].head;
        const text = `subscription { agentsUpdated(afterPosition: "${head}") { position agent { id name status } } }`;
        await type(page, text, 'subscription');
        const message = run(page, 'the subscription message', (b) => b.data?.agentsUpdated || b.errors);
        message.catch(() => {}); // awaited below; not an unhandled rejection meanwhile
        await until(STEP_MS, 'the subscribe message on the socket', () =>
          frames.sent.some((f) => f.type === 'subscribe'),
        );
        emit('subscribed', { afterPosition: head });
        const body = await message;
        const init = frames.sent.find((f) => f.type === 'connection_init');
        // Stop it (the execute button is the stop button while it runs).
        await page.locator('.graphiql-execute-button').click();
        await until(STEP_MS, 'the complete message on the socket', () =>
          frames.sent.some((f) => f.type === 'complete'),
        );
        return {
          typed: text,
          response: body,
          connectionInitAuthorized: init?.payload?.authorization === `Bearer ${token}`,
          sent: frames.sent.map((f) => f.type),
          received: frames.received.map((f) => f.type),
        };
      });
    }
  }
  result.cspViolations = await page.evaluate(() => window.__violations ?? []).catch(() => []);
} catch (e) {
  result.error = redact(e.stack ?? e.message);
} finally {
  if (browser) await browser.close();
}
if (result.error || Object.values(result.steps).some((s) => !s.ok)) status = 1;
emit('result', result);
process.exitCode = status;
