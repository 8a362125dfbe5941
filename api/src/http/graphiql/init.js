// Starts GraphiQL on the page served at `/` (api/src/graphiql/page.html).
// Everything comes from the page's own server: the endpoints are relative to
// the page's address, and the bearer token, when the page was opened as
// `/?token=<jwt>`, is in the root element's `data-authorization` (the server
// lets only base64url characters and dots through). It goes into the header
// of queries and mutations and into the `connection_init` payload of the
// graphql-transport-ws socket that carries subscriptions.
//
// The page's Content-Security-Policy refuses inline styles but those with
// the response's nonce (`data-style-nonce`). GraphiQL makes one: the <style>
// element that locks scrolling while a dialog is open, which its bundled
// `get-nonce` tags with the global `__webpack_nonce__`.
(function () {
  'use strict';
  var root = document.getElementById('graphiql');
  window.__webpack_nonce__ = root.dataset.styleNonce;
  var http = new URL(root.dataset.endpoint, window.location.href);
  var ws = new URL(root.dataset.subscriptionEndpoint, window.location.href);
  ws.protocol = ws.protocol === 'https:' ? 'wss:' : 'ws:';
  var options = { url: http.href, subscriptionUrl: ws.href };
  var authorization = root.dataset.authorization;
  if (authorization) {
    options.headers = { Authorization: authorization };
    options.wsConnectionParams = { authorization: authorization };
  }
  ReactDOM.createRoot(root).render(
    React.createElement(GraphiQL, {
      fetcher: GraphiQL.createFetcher(options),
      defaultEditorToolsVisibility: true,
    })
  );
})();
