// Writes the public Matter *test* PAA certificates that matter.js ships (NoVID and FFF1) as DER files into DIR,
// plus a fresh ".version" so python-matter-server neither deletes them nor tries to download others.
// usage: node export-paa.mjs DIR
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { TestCert_PAA_NoVID_Cert, TestCert_PAA_FFF1_Cert } from "@matter/main/protocol";

const dir = process.argv[2];
if (!dir) {
    process.stderr.write("usage: node export-paa.mjs DIR\n");
    process.exit(2);
}
mkdirSync(dir, { recursive: true });
writeFileSync(join(dir, "Chip-Test-PAA-NoVID-Cert.der"), TestCert_PAA_NoVID_Cert);
writeFileSync(join(dir, "Chip-Test-PAA-FFF1-Cert.der"), TestCert_PAA_FFF1_Cert);
writeFileSync(join(dir, ".version"), "1");
