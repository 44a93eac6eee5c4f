// The search page shows a snippet of each hit from the page's main content; on a chapter page that content
// starts with the launch buttons ("Colab", ".ipynb", ".pdf"), which then stood in for the page's text.
// Strip the page furniture before Sphinx extracts the text.
document.addEventListener("DOMContentLoaded", () => {
  if (typeof Search === "undefined" || !Search.htmlToText) return;
  const original = Search.htmlToText;
  const furniture = [".bd-header-article", ".header-article-items", ".article-header-buttons",
    ".dropdown-launch-buttons", ".prev-next-area", ".bd-sidebar-secondary", ".cell.tag_hide-input .cell_input"];
  Search.htmlToText = (htmlString, anchor) => {
    const doc = new DOMParser().parseFromString(htmlString, "text/html");
    for (const q of furniture) doc.querySelectorAll(q).forEach((el) => el.remove());
    return original(doc.documentElement.outerHTML, anchor);
  };
});
