// Prints the public JWK (RSA/EC/OKP) of a PEM private or public key, for the
// "jwks" of a private_key_jwt client in the server config.
//   node tests/oauth-server/pem-to-jwk.mjs key.pem [kid]
import { createPublicKey } from 'node:crypto';
import { readFileSync } from 'node:fs';

const [file, kid] = process.argv.slice(2);
if (!file) {
  process.stderr.write('usage: node pem-to-jwk.mjs <key.pem> [kid]\n');
  process.exit(2);
}
const jwk = createPublicKey(readFileSync(file)).export({ format: 'jwk' });
process.stdout.write(`${JSON.stringify(kid ? { ...jwk, kid } : jwk)}\n`);
