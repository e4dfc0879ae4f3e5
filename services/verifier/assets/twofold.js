// Progressive enhancement only: every flow works without this file.
document.documentElement.classList.add("has-js");
document.addEventListener("click", function (event) {
  var button = event.target.closest("[data-copy]");
  if (!button) return;
  var source = document.getElementById(button.getAttribute("data-copy"));
  if (!source || !navigator.clipboard) return;
  navigator.clipboard.writeText(source.innerText).then(function () {
    button.textContent = "Copied";
  });
});
