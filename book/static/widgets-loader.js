// Loaded after require.js and before the Jupyter widgets manager (embed-amd.js).
// Points the manager and require.js at copies served by this book, so that
// widgets render with no third-party host:
// - require.js paths for the manager itself (its fonts are fetched relative to
//   the module's own URL) and for the anywidget front end;
// - the manager's "CDN" base, where it would fetch any other widget module.
(function () {
  var here = document.currentScript && document.currentScript.src;
  if (!here) return;
  var base = here.replace(/widgets-loader\.js(\?.*)?$/, "");
  if (window.requirejs) {
    window.requirejs.config({
      paths: {
        "@jupyter-widgets/html-manager": base + "cdn/@jupyter-widgets/html-manager",
        anywidget: base + "anywidget/index",
      },
    });
  }
  // embed-amd.js reads data-jupyter-widgets-cdn from the page's <script> tags
  var marker = document.createElement("script");
  marker.type = "text/plain";
  marker.setAttribute("data-jupyter-widgets-cdn", base + "cdn/");
  document.head.appendChild(marker);
})();
