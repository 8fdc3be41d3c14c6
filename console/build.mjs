// Bundles the console: src/main.js (with the generated clients and Connect's gRPC-Web
// transport) into <out>/console.js, and copies index.html beside it. The output is the same
// bytes on every run and machine: `mesh up` embeds the committed dist/ files, and check.sh
// compares them with a fresh build.
//
//   node build.mjs [--out <dir>]     (default: dist)

import { mkdir, readFile, writeFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));

function parseArgs(argv) {
  let out = "dist";
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--out") {
      if (i + 1 >= argv.length) throw new Error("--out needs a directory");
      out = argv[++i];
    } else if (arg.startsWith("--out=")) {
      out = arg.slice("--out=".length);
    } else {
      throw new Error(`unknown argument ${JSON.stringify(arg)} (usage: node build.mjs [--out <dir>])`);
    }
  }
  if (!out) throw new Error("--out needs a directory");
  return { out: resolve(process.cwd(), out) };
}

async function main() {
  const { out } = parseArgs(process.argv.slice(2));
  const result = await build({
    absWorkingDir: here,
    entryPoints: ["src/main.js"],
    bundle: true,
    format: "esm",
    platform: "browser",
    target: "es2020",
    minify: true,
    sourcemap: false,
    legalComments: "none",
    charset: "ascii",
    write: false,
    outfile: join(out, "console.js"),
    logLevel: "warning",
  });
  if (result.outputFiles.length !== 1) {
    throw new Error(`expected one output file, esbuild made ${result.outputFiles.length}`);
  }

  const html = await readFile(join(here, "index.html"), "utf8");
  if (!html.includes('<script type="module" src="console.js"></script>')) {
    throw new Error("index.html must load the bundle as <script type=\"module\" src=\"console.js\">");
  }
  if (!html.includes('content="{{MESH_AGGREGATOR_URL}}"')) {
    throw new Error("index.html lost the {{MESH_AGGREGATOR_URL}} placeholder that mesh up replaces");
  }

  await mkdir(out, { recursive: true });
  await writeFile(join(out, "console.js"), result.outputFiles[0].contents);
  await writeFile(join(out, "index.html"), html);
  const kib = (result.outputFiles[0].contents.length / 1024).toFixed(1);
  console.log(`built ${join(out, "console.js")} (${kib} KiB) and ${join(out, "index.html")}`);
}

main().catch((err) => {
  console.error(`build failed: ${err.message}`);
  process.exit(1);
});
