// Validates AsyncAPI documents with the official parser (@asyncapi/parser): prints every
// diagnostic, exits 1 if any has error severity (or a file cannot be read), 0 otherwise.
//
//   node scripts/asyncapi/validate.mjs doc.json [more.json ...]
//
// ASYNCAPI_NODE_MODULES names the directory whose node_modules holds @asyncapi/parser
// (scripts/asyncapi.sh installs it into target/asyncapi-node and sets it).
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';

const modules = process.env.ASYNCAPI_NODE_MODULES;
if (!modules) {
  console.error('ASYNCAPI_NODE_MODULES is not set (scripts/asyncapi.sh sets it)');
  process.exit(2);
}
const require = createRequire(path.join(modules, 'package.json'));
const { Parser, DiagnosticSeverity } = require('@asyncapi/parser');

const severity = (s) =>
  ({ 0: 'error', 1: 'warning', 2: 'information', 3: 'hint' })[s] ?? String(s);

const parser = new Parser();
let failed = false;
for (const file of process.argv.slice(2)) {
  let source;
  try {
    source = await readFile(file, 'utf8');
  } catch (e) {
    console.error(`${file}: cannot read: ${e.message}`);
    failed = true;
    continue;
  }
  const { document, diagnostics } = await parser.parse(source, { source: path.resolve(file) });
  const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
  for (const d of diagnostics) {
    const where = d.path && d.path.length ? d.path.join('/') : '(document)';
    console.log(`  ${file}: ${severity(d.severity)} ${d.code}: ${d.message} at ${where}`);
  }
  if (errors.length > 0 || !document) {
    console.log(`${file}: INVALID (${errors.length} errors, ${diagnostics.length} diagnostics)`);
    failed = true;
  } else {
    const channels = document.channels().length;
    const operations = document.operations().length;
    const messages = document.components().messages().length;
    console.log(
      `${file}: valid AsyncAPI ${document.version()} (${channels} channels, ${operations} operations, ` +
        `${messages} messages, ${diagnostics.length} non-error diagnostics)`,
    );
  }
}
process.exit(failed ? 1 : 0);
