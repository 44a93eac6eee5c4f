// Loaded after require.js and before the Jupyter widgets manager (embed-amd.js).
// Points the manager and require.js at copies served by this book, so that
// widgets render with no third-party host: the manager's "CDN" base (where it
// fetches its fonts and unknown widget modules) and the anywidget front end.
(function () {
  var here = document.currentScript && document.currentScript.src;
  if (!here) return;
  var base = here.replace(/widgets-loader\.js(\?.*)?$/, "");
  if (window.requirejs) {
    window.requirejs.config({ paths: { anywidget: base + "anywidget/index" } });
  }
  // embed-amd.js reads data-jupyter-widgets-cdn from the page's <script> tags
  var marker = document.createElement("script");
  marker.type = "text/plain";
  marker.setAttribute("data-jupyter-widgets-cdn", base + "cdn/");
  marker.setAttribute("data-jupyter-widgets-cdn-only", "");
  document.head.appendChild(marker);
})();
