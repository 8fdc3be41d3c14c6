// The mesh console: a plain-DOM page that calls the aggregator over gRPC-Web.
//
// Sign up or log in, then: the caller's profile and sessions (GetMe), an edit form
// (UpdateProfile with an update mask and the expected version) and the live profile change
// log (WatchProfiles), resumed after any disconnect from the last sequence seen. Every failure
// is shown in the page (`#error`, or `#watch-detail` for the stream); nothing is thrown
// uncaught and nothing is written to the console.

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { AggregatorService, ProfileEventKind } from "./gen/mesh/aggregator/v1/aggregator_pb.js";

/** What index.html holds until `mesh up` serves it. */
const PLACEHOLDER = "{{MESH_AGGREGATOR_URL}}";
/** Where the aggregator listens when the page is opened from disk or an unreplaced copy. */
const DEFAULT_AGGREGATOR = "http://127.0.0.1:50051";
/** Deadline of each unary call. */
const CALL_TIMEOUT_MS = 15000;
/** Reconnect backoff of the change log: first wait, longest wait. */
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 10000;
/** A stream that stayed open this long resets the backoff. */
const STABLE_STREAM_MS = 5000;
/** Events kept in the list (newest first). */
const MAX_EVENTS = 500;

const $ = (id) => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`#${id} missing from the page`);
  return el;
};

function aggregatorUrl() {
  const meta = document.querySelector('meta[name="mesh-aggregator"]');
  const value = meta ? (meta.getAttribute("content") || "").trim() : "";
  if (!value || value === PLACEHOLDER) return DEFAULT_AGGREGATOR;
  return value.replace(/\/+$/, "");
}

const baseUrl = aggregatorUrl();
// tonic-web speaks the binary gRPC-Web format only (no JSON).
const transport = createGrpcWebTransport({ baseUrl, useBinaryFormat: true });
const client = createClient(AggregatorService, transport);

/** The signed-in caller: tokens, profile; `gen` changes on every sign-in and sign-out. */
const state = { tokens: null, profile: null, gen: 0 };
/** The change log's cursor: the largest sequence shown, as a bigint, or undefined. */
const watch = { lastSequence: undefined, abort: null, gen: 0 };

// ---- small helpers ---------------------------------------------------------------------

function describe(err) {
  const ce = ConnectError.from(err);
  const name = Code[ce.code] ?? `code ${ce.code}`;
  return { code: ce.code, text: `${name} (${ce.code}): ${ce.rawMessage || "no message"}` };
}

function showError(context, err) {
  const el = $("error");
  el.textContent = `${context}: ${describe(err).text}`;
  el.hidden = false;
  $("notice").hidden = true;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function notice(text) {
  const el = $("notice");
  el.textContent = text;
  el.hidden = !text;
}

function fmtTime(ts) {
  if (!ts) return "—";
  try {
    return timestampDate(ts).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  } catch {
    return "—";
  }
}

function kindName(kind) {
  return ProfileEventKind[kind] ?? `KIND_${kind}`;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

function span(text, className) {
  const s = document.createElement("span");
  if (className) s.className = className;
  s.textContent = text;
  return s;
}

/** Runs `fn` with the submit button disabled; failures land in #error. */
async function busy(button, context, fn) {
  button.disabled = true;
  clearError();
  notice("");
  try {
    await fn();
  } catch (err) {
    showError(context, err);
  } finally {
    button.disabled = false;
  }
}

// ---- tokens ----------------------------------------------------------------------------

function authHeaders() {
  return state.tokens ? { authorization: `Bearer ${state.tokens.accessToken}` } : {};
}

let refreshing = null;

/** Rotates the refresh token once, however many calls ask at the same time. */
function refreshTokens() {
  if (!refreshing) {
    const gen = state.gen;
    const refreshToken = state.tokens?.refreshToken;
    refreshing = (async () => {
      if (!refreshToken) throw new ConnectError("not signed in", Code.Unauthenticated);
      const res = await client.refresh({ refreshToken }, { timeoutMs: CALL_TIMEOUT_MS });
      if (gen === state.gen && res.tokens) state.tokens = res.tokens;
    })().finally(() => { refreshing = null; });
  }
  return refreshing;
}

/** Calls `fn(headers)`; on UNAUTHENTICATED refreshes the tokens once and calls again. */
async function withAuth(fn) {
  try {
    return await fn(authHeaders());
  } catch (err) {
    if (ConnectError.from(err).code !== Code.Unauthenticated || !state.tokens?.refreshToken) throw err;
    await refreshTokens();
    return await fn(authHeaders());
  }
}

// ---- rendering -------------------------------------------------------------------------

function renderSignedIn(signedIn) {
  $("signed-out").hidden = signedIn;
  for (const id of ["me", "edit", "watch"]) $(id).hidden = !signedIn;
}

function renderProfile(profile, fillForm) {
  state.profile = profile ?? null;
  $("me-name").textContent = profile ? profile.displayName : "(no profile)";
  $("me-user-id").textContent = profile ? profile.userId : "";
  $("me-email").textContent = profile ? profile.email : "";
  $("me-bio").textContent = profile && profile.bio ? profile.bio : "—";
  $("me-version").textContent = profile ? String(profile.version) : "";
  if (fillForm && profile) {
    $("edit-name").value = profile.displayName;
    $("edit-bio").value = profile.bio;
  }
}

function renderSessions(sessions) {
  const list = $("sessions");
  list.replaceChildren();
  for (const s of sessions) {
    const li = document.createElement("li");
    li.dataset.sessionId = s.sessionId;
    li.append(span(s.sessionId, "mono"));
    if (s.current) li.append(" ", span("this session", "current"));
    li.append(
      document.createElement("br"),
      span(`created ${fmtTime(s.createTime)} · last used ${fmtTime(s.lastUseTime)} · expires ${fmtTime(s.expireTime)}`, "muted"),
    );
    list.append(li);
  }
  if (sessions.length === 0) list.append(span("no live sessions", "muted"));
}

function setWatchState(name, detail) {
  const el = $("watch-state");
  el.textContent = name;
  el.dataset.state = name;
  if (detail !== undefined) $("watch-detail").textContent = detail;
}

function renderEvent(ev) {
  const li = document.createElement("li");
  const seq = String(ev.sequence);
  const kind = kindName(ev.kind);
  const name = ev.profile ? ev.profile.displayName : "";
  li.dataset.sequence = seq;
  li.dataset.kind = kind;
  li.append(
    span(`#${seq}`, "mono"), " ",
    span(kind, "kind"), " ",
    span(name || "(no name)"), " ",
    span(`${ev.profile ? ev.profile.userId : ""} · ${fmtTime(ev.occurTime)}`, "muted mono"),
  );
  const list = $("events");
  list.prepend(li);
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
}

// ---- calls -----------------------------------------------------------------------------

async function loadMe(fillForm) {
  const res = await withAuth((headers) => client.getMe({}, { headers, timeoutMs: CALL_TIMEOUT_MS }));
  renderProfile(res.profile, fillForm);
  renderSessions(res.sessions);
  $("me-token-expire").textContent = fmtTime(res.tokenExpireTime);
}

async function signedIn(tokens) {
  if (!tokens) throw new ConnectError("the server returned no tokens", Code.Internal);
  state.gen += 1;
  state.tokens = tokens;
  state.profile = null;
  $("events").replaceChildren();
  watch.lastSequence = undefined;
  $("watch-last").textContent = "none";
  renderSignedIn(true);
  startWatch();
  await loadMe(true);
}

function signedOut() {
  state.gen += 1;
  state.tokens = null;
  stopWatch();
  renderProfile(null, false);
  $("sessions").replaceChildren();
  renderSignedIn(false);
}

// ---- the change log --------------------------------------------------------------------

function startWatch() {
  stopWatch();
  const gen = ++watch.gen;
  watchLoop(gen).catch((err) => {
    // The loop catches its own call errors; this is a bug guard.
    if (gen === watch.gen) setWatchState("stopped", describe(err).text);
  });
}

function stopWatch() {
  watch.gen += 1;
  if (watch.abort) watch.abort.abort();
  watch.abort = null;
  setWatchState("idle", "");
}

/**
 * Keeps one WatchProfiles stream open. The first one starts at the live edge; every later one
 * asks for `after_sequence` = the last sequence seen, which the server replays from with no
 * gap and no duplicate (older or equal sequences are skipped here too, in case).
 */
async function watchLoop(gen) {
  let backoff = BACKOFF_MIN_MS;
  while (gen === watch.gen) {
    const ctrl = new AbortController();
    watch.abort = ctrl;
    let openedAt = 0;
    let why;
    setWatchState("connecting", watch.lastSequence === undefined ? "" : `resuming after #${watch.lastSequence}`);
    try {
      const request = watch.lastSequence === undefined ? {} : { afterSequence: watch.lastSequence };
      const stream = client.watchProfiles(request, {
        signal: ctrl.signal,
        headers: authHeaders(),
        onHeader: () => {
          if (gen !== watch.gen) return;
          openedAt = Date.now();
          setWatchState("live", watch.lastSequence === undefined ? "from the live edge" : `resumed after #${watch.lastSequence}`);
        },
      });
      for await (const ev of stream) {
        if (gen !== watch.gen) return;
        if (watch.lastSequence !== undefined && ev.sequence <= watch.lastSequence) continue;
        watch.lastSequence = ev.sequence;
        $("watch-last").textContent = String(ev.sequence);
        renderEvent(ev);
        followOwnProfile(ev);
      }
      why = "the server ended the stream";
    } catch (err) {
      if (gen !== watch.gen || ctrl.signal.aborted) return;
      const { code, text } = describe(err);
      why = text;
      if (code === Code.Unauthenticated) {
        try {
          await refreshTokens();
        } catch (refreshErr) {
          if (gen !== watch.gen) return;
          setWatchState("stopped", `session ended: ${describe(refreshErr).text}`);
          return;
        }
      } else if (code === Code.OutOfRange) {
        // Our cursor is before the server's retained start (or past its newest): start again
        // at the live edge and say that events in between are not shown.
        watch.lastSequence = undefined;
        why += "; restarting from the live edge (older events are no longer kept)";
      }
    }
    if (gen !== watch.gen) return;
    if (openedAt && Date.now() - openedAt >= STABLE_STREAM_MS) backoff = BACKOFF_MIN_MS;
    const wait = Math.round(backoff * (0.75 + Math.random() * 0.5));
    setWatchState("reconnecting", `${why}; retrying in ${(wait / 1000).toFixed(1)} s`);
    await sleep(wait, ctrl.signal);
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
  }
}

/** A change to the caller's own profile made elsewhere shows at once. */
function followOwnProfile(ev) {
  const own = state.profile;
  if (!own || !ev.profile || ev.profile.userId !== own.userId) return;
  if (ev.kind === ProfileEventKind.DELETED) return;
  if (ev.profile.version <= own.version) return;
  const editing = document.activeElement === $("edit-name") || document.activeElement === $("edit-bio");
  renderProfile({ ...own, displayName: ev.profile.displayName, bio: ev.profile.bio, version: ev.profile.version, updateTime: ev.profile.updateTime }, !editing);
}

// ---- forms -----------------------------------------------------------------------------

function onSubmit(formId, handler) {
  $(formId).addEventListener("submit", (event) => {
    event.preventDefault();
    handler().catch((err) => showError("unexpected", err));
  });
}

onSubmit("signup-form", () => busy($("signup-submit"), "Sign up", async () => {
  const res = await client.signUp({
    email: $("signup-email").value.trim(),
    password: $("signup-password").value,
    displayName: $("signup-name").value.trim(),
  }, { timeoutMs: CALL_TIMEOUT_MS });
  $("signup-password").value = "";
  await signedIn(res.tokens);
}));

onSubmit("login-form", () => busy($("login-submit"), "Log in", async () => {
  const res = await client.login({
    email: $("login-email").value.trim(),
    password: $("login-password").value,
  }, { timeoutMs: CALL_TIMEOUT_MS });
  $("login-password").value = "";
  await signedIn(res.tokens);
}));

onSubmit("edit-form", () => busy($("edit-submit"), "Update profile", async () => {
  const current = state.profile;
  if (!current) throw new ConnectError("there is no profile to edit", Code.FailedPrecondition);
  const displayName = $("edit-name").value.trim();
  const bio = $("edit-bio").value;
  // Only the fields that changed go in the mask; the version guards against a lost update.
  const paths = [];
  if (displayName !== current.displayName) paths.push("display_name");
  if (bio !== current.bio) paths.push("bio");
  if (paths.length === 0) {
    notice("Nothing changed.");
    return;
  }
  try {
    const profile = await withAuth((headers) => client.updateProfile({
      profile: { displayName, bio },
      updateMask: { paths },
      expectedVersion: current.version,
    }, { headers, timeoutMs: CALL_TIMEOUT_MS }));
    renderProfile({ ...current, ...profile, email: profile.email || current.email }, true);
    notice(`Saved (version ${profile.version}).`);
  } catch (err) {
    if (ConnectError.from(err).code === Code.Aborted) {
      // Changed elsewhere since it was read: show the stored profile and let the user retry.
      showError("Update profile (the profile changed meanwhile, reloaded it; check and save again)", err);
      await loadMe(true).catch((e) => showError("GetMe", e));
      return;
    }
    throw err;
  }
}));

$("me-refresh").addEventListener("click", () => {
  busy($("me-refresh"), "GetMe", () => loadMe(false)).catch((err) => showError("unexpected", err));
});

$("logout").addEventListener("click", () => {
  busy($("logout"), "Log out", async () => {
    const refreshToken = state.tokens?.refreshToken;
    signedOut();
    if (refreshToken) await client.logout({ refreshToken }, { timeoutMs: CALL_TIMEOUT_MS });
    notice("Logged out.");
  }).catch((err) => showError("unexpected", err));
});

// Anything that still escapes is shown, not left for the console.
window.addEventListener("unhandledrejection", (event) => {
  event.preventDefault();
  showError("unexpected", event.reason);
});
window.addEventListener("error", (event) => {
  event.preventDefault();
  showError("unexpected", event.error ?? event.message);
});

$("aggregator-url").textContent = baseUrl;
renderSignedIn(false);
