// trioflow's /docs page: starts Swagger UI on the element #swagger-ui.
// A file of its own, not an inline script: the page's Content-Security-Policy
// allows scripts from the server only. The page gives the document's URL in
// data-openapi-url.
(function () {
  "use strict";
  var root = document.getElementById("swagger-ui");
  SwaggerUIBundle({
    url: root.getAttribute("data-openapi-url"),
    domNode: root,
    deepLinking: true,
    displayRequestDuration: true,
    // No badge fetched from validator.swagger.io: the page talks to this server only.
    validatorUrl: null,
    // Never load another document named in the page's query string (?url=).
    queryConfigEnabled: false,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
})();
