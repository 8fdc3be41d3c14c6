// Calls the aggregator over gRPC-Web on HTTP/1.1 the way a browser does (Connect's Node
// transport, not the page's code) and checks unary and streaming calls, error statuses, a
// deadline, the request id and the CORS rules. One line per check; exits 1 if any fails.
//
//   MESH_AGGREGATOR_URL=http://127.0.0.1:50051 MESH_CORS_ALLOWED=http://127.0.0.1:8080 \
//     node test/grpc-web.mjs

import { randomBytes } from "node:crypto";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-node";
import { AggregatorService } from "../src/gen/mesh/aggregator/v1/aggregator_pb.js";

const baseUrl = (process.env.MESH_AGGREGATOR_URL || "http://127.0.0.1:50051").replace(/\/+$/, "");
const allowedOrigin = process.env.MESH_CORS_ALLOWED || "http://127.0.0.1:8080";
const evilOrigin = "https://evil.example";
const CALL_MS = 10000;

const transport = createGrpcWebTransport({ baseUrl, httpVersion: "1.1", useBinaryFormat: true });
const client = createClient(AggregatorService, transport);

let passed = 0;
let failed = 0;

function reason(err) {
  if (err instanceof ConnectError) return `${Code[err.code] ?? err.code} (${err.code}): ${err.rawMessage}`;
  return err instanceof Error ? err.message : String(err);
}

async function check(name, fn) {
  try {
    const detail = await fn();
    passed++;
    console.log(`ok   ${name}${detail ? ` — ${detail}` : ""}`);
  } catch (err) {
    failed++;
    console.log(`FAIL ${name} — ${reason(err)}`);
  }
}

function assert(cond, message) {
  if (!cond) throw new Error(message);
}

/** Runs `fn` and expects a ConnectError with one of `codes`; returns it. */
async function expectCode(fn, codes) {
  try {
    await fn();
  } catch (err) {
    const ce = ConnectError.from(err);
    if (!codes.includes(ce.code)) {
      throw new Error(`got ${Code[ce.code]} (${ce.code}) "${ce.rawMessage}", want ${codes.map((c) => Code[c]).join(" or ")}`);
    }
    return ce;
  }
  throw new Error(`succeeded, want ${codes.map((c) => Code[c]).join(" or ")}`);
}

const bearer = (tokens) => ({ authorization: `Bearer ${tokens.accessToken}` });
const rand = randomBytes(6).toString("hex");
const email = `grpc-web-${rand}@example.com`;
const password = `pw-${randomBytes(12).toString("hex")}`;
const displayName = `Web ${rand}`;
/** Set by the SignUp check; the checks that need an account fail without it. */
let account = null;
const needAccount = () => {
  if (!account) throw new Error("skipped: SignUp failed");
  return account;
};

const guard = setTimeout(() => {
  console.log("FAIL the checks did not finish within 90 s");
  console.log(`${passed} passed, ${failed + 1} failed`);
  process.exit(1);
}, 90000);
guard.unref();

console.log(`gRPC-Web over HTTP/1.1 to ${baseUrl}`);

await check("unary SignUp", async () => {
  const res = await client.signUp({ email, password, displayName }, { timeoutMs: CALL_MS });
  assert(res.profile && res.tokens, "no profile or tokens in the answer");
  assert(res.profile.displayName === displayName, `display name ${JSON.stringify(res.profile.displayName)}`);
  assert(res.tokens.accessToken.length > 0, "empty access token");
  account = { id: res.profile.userId, tokens: res.tokens };
  return `user ${account.id}`;
});

await check("unary GetMe with the bearer token", async () => {
  const { id, tokens } = needAccount();
  const res = await client.getMe({}, { headers: bearer(tokens), timeoutMs: CALL_MS });
  const p = res.profile;
  assert(p, "no profile");
  assert(p.userId === id, `user id ${p.userId}, want ${id}`);
  assert(p.displayName === displayName, `display name ${JSON.stringify(p.displayName)}`);
  assert(p.email === email, `email ${JSON.stringify(p.email)}`);
  assert(res.sessions.length >= 1 && res.sessions.some((s) => s.current), "no current session listed");
  return `${p.displayName} <${p.email}>, ${res.sessions.length} session(s)`;
});

await check("server streaming GetProfiles", async () => {
  const { id, tokens } = needAccount();
  const missing = "00000000-0000-7000-8000-000000000000";
  const results = [];
  for await (const r of client.getProfiles({ userIds: [id, missing] }, { headers: bearer(tokens), timeoutMs: CALL_MS })) {
    results.push(r);
  }
  assert(results.length === 2, `${results.length} results, want 2`);
  const mine = results.find((r) => r.userId === id);
  assert(mine && mine.result.case === "profile", `no profile result for ${id}`);
  assert(mine.result.value.displayName === displayName, `display name ${JSON.stringify(mine.result.value.displayName)}`);
  const other = results.find((r) => r.userId === missing);
  assert(other && other.result.case === "error", "no ItemError for the unknown id");
  return `2 messages: profile ${id}, ItemError ${other.result.value.code} for the unknown id`;
});

await check("error status: GetMe without a token is UNAUTHENTICATED", async () => {
  const ce = await expectCode(() => client.getMe({}, { timeoutMs: CALL_MS }), [Code.Unauthenticated]);
  // Where the status travelled: HTTP headers (a trailers-only answer) or the trailer frame.
  const res = await fetch(`${baseUrl}/mesh.aggregator.v1.AggregatorService/GetMe`, {
    method: "POST",
    headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
    body: new Uint8Array([0, 0, 0, 0, 0]),
  });
  const body = new Uint8Array(await res.arrayBuffer());
  let where = res.headers.get("grpc-status") !== null ? `HTTP headers (trailers-only), grpc-status ${res.headers.get("grpc-status")}` : "";
  for (let i = 0; !where && i + 5 <= body.length;) {
    const len = new DataView(body.buffer, body.byteOffset + i + 1, 4).getUint32(0);
    if (body[i] & 0x80) {
      const text = new TextDecoder().decode(body.subarray(i + 5, i + 5 + len));
      where = `trailer frame: ${text.trim().split(/\r?\n/).join("; ")}`;
    }
    i += 5 + len;
  }
  assert(where, "a raw gRPC-Web POST got no grpc-status in headers or in a trailer frame");
  return `${Code[ce.code]} "${ce.rawMessage}"; raw HTTP ${res.status}, status in ${where}`;
});

await check("error status: Login with a wrong password is UNAUTHENTICATED", async () => {
  needAccount();
  const ce = await expectCode(
    () => client.login({ email, password: `${password}-wrong` }, { timeoutMs: CALL_MS }),
    [Code.Unauthenticated],
  );
  return `"${ce.rawMessage}"`;
});

await check("unary Login with the right password", async () => {
  const { id } = needAccount();
  const res = await client.login({ email, password }, { timeoutMs: CALL_MS });
  assert(res.tokens && res.tokens.accessToken, "no tokens");
  assert(!res.profile || res.profile.userId === id, `profile of ${res.profile?.userId}`);
  const me = await client.getMe({}, { headers: bearer(res.tokens), timeoutMs: CALL_MS });
  assert(me.sessions.length >= 2, `${me.sessions.length} session(s) after a second login, want 2`);
  return `${me.sessions.length} sessions now`;
});

/** Opens WatchProfiles until it fails; retries UNAVAILABLE (the relay not connected yet) for 10 s. */
async function watchUntilError(options) {
  const start = Date.now();
  for (;;) {
    const t0 = Date.now();
    let headers = false;
    try {
      let n = 0;
      for await (const _ of client.watchProfiles({}, { ...options(), onHeader: () => { headers = true; } })) n++;
      throw new Error(`the stream ended without an error after ${n} event(s)`);
    } catch (err) {
      const ce = ConnectError.from(err);
      if (ce.code === Code.Unavailable && Date.now() - start < 10000) {
        await new Promise((r) => setTimeout(r, 500));
        continue;
      }
      // After response headers, the status can only have come in the trailer frame.
      return { ce, ms: Date.now() - t0, where: headers ? "in the trailer frame, after the headers" : "without response headers" };
    }
  }
}

await check("deadline: WatchProfiles with timeoutMs 300 is DEADLINE_EXCEEDED", async () => {
  const { tokens } = needAccount();
  const { ce, ms } = await watchUntilError(() => ({ headers: bearer(tokens), timeoutMs: 300 }));
  assert(ce.code === Code.DeadlineExceeded, `got ${Code[ce.code]} (${ce.code}) "${ce.rawMessage}"`);
  return `after ${ms} ms`;
});

await check("deadline: the server ends WatchProfiles at grpc-timeout 300m", async () => {
  // No client-side timer: only the server's deadline can end this one (the 5 s abort is a guard).
  const { tokens } = needAccount();
  const { ce, ms, where } = await watchUntilError(() => ({
    headers: { ...bearer(tokens), "grpc-timeout": "300m" },
    signal: AbortSignal.timeout(5000),
  }));
  assert(ce.code === Code.DeadlineExceeded, `got ${Code[ce.code]} (${ce.code}) "${ce.rawMessage}" after ${ms} ms`);
  return `server answered DEADLINE_EXCEEDED after ${ms} ms, ${where}`;
});

await check("x-request-id is echoed in the response headers", async () => {
  const { tokens } = needAccount();
  const sent = `grpc-web-check-${rand}`;
  let echoed = null;
  await client.getMe({}, {
    headers: { ...bearer(tokens), "x-request-id": sent },
    timeoutMs: CALL_MS,
    onHeader: (h) => { echoed = h.get("x-request-id"); },
  });
  assert(echoed === sent, `sent ${sent}, got ${JSON.stringify(echoed)}`);
  let generated = null;
  await client.getMe({}, { headers: bearer(tokens), timeoutMs: CALL_MS, onHeader: (h) => { generated = h.get("x-request-id"); } });
  assert(generated, "no x-request-id on a call that sent none");
  return `echoed ${sent}; a call without one got ${generated}`;
});

await check(`CORS: a gRPC-Web call from ${allowedOrigin} may read the status headers`, async () => {
  const { tokens } = needAccount();
  let h = null;
  await client.getMe({}, { headers: { ...bearer(tokens), origin: allowedOrigin }, timeoutMs: CALL_MS, onHeader: (x) => { h = x; } });
  assert(h.get("access-control-allow-origin") === allowedOrigin, `access-control-allow-origin ${JSON.stringify(h.get("access-control-allow-origin"))}`);
  const exposed = (h.get("access-control-expose-headers") || "").toLowerCase().split(/\s*,\s*/);
  for (const name of ["grpc-status", "grpc-message", "x-request-id"]) {
    assert(exposed.includes(name), `access-control-expose-headers lacks ${name}: ${JSON.stringify(exposed.join(","))}`);
  }
  return `exposes ${exposed.join(",")}`;
});

async function preflight(origin) {
  return fetch(`${baseUrl}/mesh.aggregator.v1.AggregatorService/GetMe`, {
    method: "OPTIONS",
    headers: {
      Origin: origin,
      "Access-Control-Request-Method": "POST",
      "Access-Control-Request-Headers": "authorization,content-type,x-grpc-web",
    },
  });
}

await check(`CORS preflight from ${allowedOrigin} is allowed`, async () => {
  const res = await preflight(allowedOrigin);
  await res.arrayBuffer();
  assert(res.status >= 200 && res.status < 300, `HTTP ${res.status}`);
  const allow = res.headers.get("access-control-allow-origin");
  assert(allow === allowedOrigin, `access-control-allow-origin ${JSON.stringify(allow)}`);
  const methods = (res.headers.get("access-control-allow-methods") || "").toUpperCase();
  assert(methods.split(/\s*,\s*/).includes("POST"), `access-control-allow-methods ${JSON.stringify(methods)}`);
  const headers = (res.headers.get("access-control-allow-headers") || "").toLowerCase().split(/\s*,\s*/);
  for (const name of ["authorization", "content-type", "x-grpc-web"]) {
    assert(headers.includes(name), `access-control-allow-headers lacks ${name}: ${JSON.stringify(headers.join(","))}`);
  }
  return `HTTP ${res.status}, allow-origin ${allow}, max-age ${res.headers.get("access-control-max-age")}`;
});

await check(`CORS preflight from ${evilOrigin} gets no allow-origin`, async () => {
  const res = await preflight(evilOrigin);
  await res.arrayBuffer();
  const allow = res.headers.get("access-control-allow-origin");
  assert(allow === null, `access-control-allow-origin ${JSON.stringify(allow)}`);
  return `HTTP ${res.status}, no access-control-allow-origin`;
});

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
