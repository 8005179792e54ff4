// The console's one script, a progressive enhancement: every form works without it.
// - the send form's live counter asks the gateway (the send URL's own rules), not a copy;
// - the API password rule (8 letters and digits) is said as you type;
// - the quota form says how many credits will move from the account.
"use strict";

(function () {
  var form = document.getElementById("send-form");
  if (form) {
    // The live counter replaces the "Count" button of the pages without JavaScript.
    form.querySelectorAll(".js-hidden").forEach(function (b) { b.hidden = true; });
    var counter = document.getElementById("counter");
    var timer = null;
    var update = function () {
      var params = new URLSearchParams({
        message: form.elements.message.value,
        to: form.elements.to.value,
        noStop: form.elements.noStop.checked ? "1" : ""
      });
      fetch(form.dataset.count + "?" + params.toString(), {credentials: "same-origin"})
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (c) {
          if (!c) { return; }
          counter.textContent = c.characters + " characters, " + c.encoding + ", " +
            c.parts + " SMS part" + (c.parts === 1 ? "" : "s") + " per recipient, " +
            c.recipients + " recipient" + (c.recipients === 1 ? "" : "s") + ": " +
            c.credits + " credits";
        });
    };
    var later = function () { clearTimeout(timer); timer = setTimeout(update, 150); };
    ["input", "change"].forEach(function (e) { form.addEventListener(e, later); });
    update();
  }

  document.querySelectorAll("input[data-rule=api-password]").forEach(function (input) {
    var out = document.querySelector(".live-check[data-for=" + input.id + "]");
    if (!out) { return; }
    input.addEventListener("input", function () {
      var v = input.value;
      if (!v) { out.textContent = ""; return; }
      if (!/^[A-Za-z0-9]*$/.test(v)) { out.textContent = "letters and digits only"; return; }
      out.textContent = v.length < 8 ? "at least 8 characters (" + v.length + " so far)"
                                     : "fits the rule";
    });
  });

  // Counted in cents, as the gateway counts credits: 150 - 149.7 is 0.3, not 0.30000000000000426.
  var cents = function (text) { return Math.round((parseFloat(text) || 0) * 100); };
  var credits = function (c) { return String(c / 100); };
  document.querySelectorAll("input[data-moves]").forEach(function (input) {
    var out = document.getElementById(input.dataset.moves);
    var active = input.form.elements.quotaStatus;
    var current = active.defaultChecked ? cents(input.defaultValue) : 0;
    var update = function () {
      // A quota switched off holds nothing: all its credits go back to the account.
      var wanted = active.checked ? cents(input.value) : 0;
      var delta = wanted - current;
      var left = credits(cents(input.dataset.balance) - wanted);
      out.textContent = delta >= 0
        ? credits(delta) + " credits will move from the account (" + left + " left)"
        : credits(-delta) + " credits will go back to the account (" + left + " left)";
    };
    input.addEventListener("input", update);
    active.addEventListener("change", update);
  });
}());
