// What clients nobody here wrote make of the API:
// - graphql-js: its own introspection query passes the API's limits,
//   `buildClientSchema` accepts the answer, times are `DateTime`, and the
//   README's example documents validate against it;
// - the `ws` WebSocket client: close frames it can read (RFC 6455 §5.5:
//   at most 125 bytes) with the protocol's codes, for a bad token (4403) and
//   for a message of an unknown type (4400);
// - graphql-ws: a subscription the server refuses before it runs reaches
//   the client's `error` callback with the GraphQL errors (the protocol's
//   `error` message), not as data;
// - Apollo Client: a query over HTTP.
//
//   node clients.mjs <base url> <token>
//   env: NEURECTOMY_TEST_DOCUMENTS — a JSON array of documents to validate
//
// Prints `result` with one field per check.
import {
  buildClientSchema,
  getIntrospectionQuery,
  getNamedType,
  parse,
  validate,
} from 'graphql';
import { createClient } from 'graphql-ws';
import WebSocket from 'ws';
import { ApolloClient, HttpLink, InMemoryCache, gql } from '@apollo/client';
import { emit, target, within } from './lib/harness.mjs';

const { url, token } = target();
const result = {};

async function graphql(query, variables = {}) {
  const response = await fetch(new URL('/graphql', url), {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    body: JSON.stringify({ query, variables }),
  });
  return response.json();
}

// How the server closes a raw socket after `messages`.
function closeAfter(messages) {
  return within(
    15_000,
    'the server closing the socket',
    new Promise((resolve, reject) => {
      const socket = new WebSocket(`ws://${url.host}/graphql/ws`, 'graphql-transport-ws');
      socket.on('open', () => {
        for (const message of messages) socket.send(JSON.stringify(message));
      });
      socket.on('close', (code, reason) => resolve({ code, reason: reason.toString() }));
      socket.on('error', reject);
    }),
  );
}

try {
  // graphql-js.
  const introspection = await graphql(
    getIntrospectionQuery({
      descriptions: true,
      specifiedByUrl: true,
      directiveIsRepeatable: true,
      schemaDescription: true,
      inputValueDeprecation: true,
    }),
  );
  if (introspection.errors) throw new Error(`introspection: ${JSON.stringify(introspection.errors)}`);
  const schema = buildClientSchema(introspection.data);
  result.types = Object.keys(schema.getTypeMap()).filter((name) => !name.startsWith('__')).length;
  const agent = schema.getType('Agent');
  result.lastEventAt = getNamedType(agent.getFields().lastEventAt.type).name;
  result.delegationAt = getNamedType(schema.getType('Delegation').getFields().at.type).name;
  const documents = JSON.parse(process.env.NEURECTOMY_TEST_DOCUMENTS || '[]');
  result.invalidDocuments = documents
    .map((document) => ({ document, errors: validate(schema, parse(document)).map((e) => e.message) }))
    .filter((checked) => checked.errors.length > 0);
  result.documents = documents.length;

  // The `ws` client reads the close frames.
  result.badToken = await closeAfter([
    { type: 'connection_init', payload: { authorization: `Bearer ${'x'.repeat(400)}` } },
  ]);
  result.unknownMessage = await closeAfter([
    { type: 'connection_init', payload: { authorization: `Bearer ${token}` } },
    { type: 'no-such-message-type', payload: { padding: 'y'.repeat(300) } },
  ]);

  // graphql-ws: a refused subscription is an error, with the errors.
  const client = createClient({
    url: `ws://${url.host}/graphql/ws`,
    webSocketImpl: WebSocket,
    connectionParams: { authorization: `Bearer ${token}` },
    retryAttempts: 0,
  });
  result.refused = await within(
    15_000,
    'the refused subscription',
    new Promise((resolve) => {
      client.subscribe(
        { query: 'subscription { agentsUpdated { position agent { noSuchField } } }' },
        {
          next: (value) => resolve({ next: value }),
          error: (errors) => resolve({ errors }),
          complete: () => resolve({ complete: true }),
        },
      );
    }),
  );
  await client.dispose();

  // Apollo Client over HTTP.
  const apollo = new ApolloClient({
    link: new HttpLink({
      uri: new URL('/graphql', url).href,
      headers: { authorization: `Bearer ${token}` },
    }),
    cache: new InMemoryCache(),
  });
  const { data } = await apollo.query({ query: gql`{ projectionStatus { name state } }` });
  result.apollo = data.projectionStatus.map((p) => p.name).sort();
  emit('result', result);
  process.exit(0);
} catch (error) {
  emit('result', { ...result, error: String(error?.stack ?? error) });
  process.exit(1);
}
