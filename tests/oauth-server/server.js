// Loopback OAuth 2.0 authorization server for token-proxy integration tests.
//
// Runs panva's `oidc-provider` (certified OpenID Provider, pinned in package.json)
// with only the client_credentials grant in use.
//
//   node tests/oauth-server/server.js <config.json> [--ignore-stdin]
//
// Listens on 127.0.0.1 on a free port, prints exactly one line
//   listening http://127.0.0.1:PORT
// to stdout once ready, and nothing else to stdout afterwards (diagnostics go to
// stderr). Exits when stdin closes (unless --ignore-stdin) and on SIGTERM/SIGINT.
//
// See README.md in this directory for the config format and behaviour.

import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { generateKeyPair, randomBytes } from 'node:crypto';
import { promisify } from 'node:util';
import process from 'node:process';

// oidc-provider prints some notices with console.info (stdout). stdout is reserved
// for the single "listening" line, so route every console method to stderr.
// This must happen before oidc-provider is imported.
for (const m of ['log', 'info', 'debug']) {
  // eslint-disable-next-line no-console
  console[m] = (...args) => console.error(...args);
}

// Start the slow parts concurrently: RSA key generation runs on the libuv thread
// pool while the main thread loads oidc-provider.
const keyPairPromise = promisify(generateKeyPair)('rsa', { modulusLength: 2048 });
const { default: Provider, errors } = await import('oidc-provider');

const DEFAULT_RESOURCE = 'urn:oauth-server:default-resource';
const DEFAULT_TTL = 600;
// Keys of our config's client objects that are ours, not oidc-provider client metadata.
const LOCAL_CLIENT_KEYS = ['access_token_ttl'];

function fail(msg) {
  process.stderr.write(`oauth-server: ${msg}\n`);
  process.exit(2);
}

const args = process.argv.slice(2);
const ignoreStdin = args.includes('--ignore-stdin');
const configPath = args.find((a) => !a.startsWith('--'));
if (!configPath) fail('usage: node server.js <config.json> [--ignore-stdin]');

let config;
try {
  config = JSON.parse(readFileSync(configPath, 'utf8'));
} catch (err) {
  fail(`cannot read config ${configPath}: ${err.message}`);
}
if (!Array.isArray(config.clients) || config.clients.length === 0) {
  fail('config.clients must be a non-empty array');
}

const defaultResource = config.resource ?? DEFAULT_RESOURCE;
const allowedResources = Array.isArray(config.resources) ? new Set(config.resources) : null;
const accessTokenFormat = config.access_token_format ?? 'jwt';
if (!['jwt', 'opaque'].includes(accessTokenFormat)) fail('access_token_format must be "jwt" or "opaque"');
const defaultTtl = Number.isInteger(config.access_token_ttl) ? config.access_token_ttl : DEFAULT_TTL;

// Every scope any client is registered for, plus config.scopes.
const allScopes = new Set(Array.isArray(config.scopes) ? config.scopes : []);
const ttlByClient = new Map();
const clients = config.clients.map((c) => {
  if (typeof c.client_id !== 'string') fail('every client needs a string client_id');
  const meta = {
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    ...c,
  };
  for (const k of LOCAL_CLIENT_KEYS) delete meta[k];
  if (Number.isInteger(c.access_token_ttl)) ttlByClient.set(c.client_id, c.access_token_ttl);
  for (const s of (c.scope ?? '').split(' ').filter(Boolean)) allScopes.add(s);
  return meta;
});

// Signing key for JWT access tokens (fresh per run; published at /jwks).
const { privateKey } = await keyPairPromise;
const signingJwk = { ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256', kid: 'oauth-server-rs256' };

// Log of token endpoint requests, served at GET /_test/requests (DELETE clears it).
const requestLog = [];

function decodeBasic(header) {
  if (typeof header !== 'string') return undefined;
  const [scheme, value] = header.split(' ');
  if (!scheme || scheme.toLowerCase() !== 'basic' || !value) return { raw: header };
  const decoded = Buffer.from(value, 'base64').toString('utf8');
  const i = decoded.indexOf(':');
  return { raw: header, user: i === -1 ? decoded : decoded.slice(0, i), password: i === -1 ? undefined : decoded.slice(i + 1) };
}

function authUsed(ctx) {
  const form = ctx.oidc?.body ?? {};
  const used = [];
  if (ctx.get('authorization')) used.push('client_secret_basic');
  if (form.client_secret !== undefined) used.push('client_secret_post');
  if (form.client_assertion !== undefined) used.push('client_assertion');
  return used.length ? used.join('+') : 'none';
}

let provider;
let handler;

const server = createServer((req, res) => {
  if (!handler) {
    res.writeHead(503).end();
    return;
  }
  handler(req, res);
});
server.on('error', (err) => fail(`server error: ${err.stack || err}`));

server.listen(0, '127.0.0.1', async () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;

  try {
    provider = new Provider(issuer, {
      clients,
      jwks: { keys: [signingJwk] },
      cookies: { keys: [randomBytes(32).toString('hex')] },
      scopes: [...allScopes],
      clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'client_secret_jwt', 'private_key_jwt', 'none'],
      enabledJWA: {
        clientAuthSigningAlgValues: [
          'HS256', 'HS384', 'HS512',
          'RS256', 'RS384', 'RS512',
          'PS256', 'PS384', 'PS512',
          'ES256', 'ES384', 'ES512',
          'EdDSA',
        ],
      },
      features: {
        clientCredentials: { enabled: true },
        // Any authenticated client may introspect any token (oidc-provider's default,
        // set explicitly to silence its "you SHOULD change" notice).
        introspection: { enabled: true, allowedPolicy: () => true },
        revocation: { enabled: true },
        devInteractions: { enabled: false },
        resourceIndicators: {
          enabled: true,
          // Used when the token request carries no `resource` parameter.
          defaultResource: () => defaultResource,
          getResourceServerInfo: (ctx, resourceIndicator) => {
            if (allowedResources && !allowedResources.has(resourceIndicator)) {
              throw new errors.InvalidTarget(`resource ${resourceIndicator} is not allowed`);
            }
            return {
              scope: [...allScopes].join(' '),
              accessTokenFormat,
              ...(accessTokenFormat === 'jwt' ? { jwt: { sign: { alg: 'RS256' } } } : {}),
            };
          },
        },
      },
      ttl: {
        ClientCredentials: (ctx, token, client) => ttlByClient.get(client.clientId) ?? defaultTtl,
      },
    });
    // oidc-provider validates static clients lazily; do it now so that a bad
    // config fails at startup instead of on the first token request.
    for (const { client_id: id } of clients) {
      // eslint-disable-next-line no-await-in-loop
      if (!await provider.Client.find(id)) throw new Error(`client ${JSON.stringify(id)} not loaded`);
    }
  } catch (err) {
    fail(`invalid configuration: ${err.message ?? err}${err.error_description ? `: ${err.error_description}` : ''}`);
  }

  provider.on('server_error', (ctx, err) => process.stderr.write(`oauth-server: server_error: ${err.stack || err}\n`));
  // oidc-provider answers every client authentication failure with the generic
  // "client authentication failed"; the real reason is only in err.error_detail.
  provider.on('grant.error', (ctx, err) => {
    ctx.state.tokenErrorDetail = err.error_detail;
    process.stderr.write(`oauth-server: token error ${err.message}: ${err.error_description ?? ''}${err.error_detail ? ` (${err.error_detail})` : ''}\n`);
  });

  // Test-only helper endpoint plus the token request log.
  provider.use(async (ctx, next) => {
    if (ctx.path === '/_test/requests') {
      if (ctx.method === 'GET') {
        ctx.body = requestLog;
      } else if (ctx.method === 'DELETE') {
        requestLog.length = 0;
        ctx.status = 204;
      } else {
        ctx.status = 405;
      }
      return;
    }
    await next();
    if (ctx.path === '/token') {
      let body = ctx.body;
      if (Buffer.isBuffer(body) || typeof body === 'string') {
        try { body = JSON.parse(body.toString()); } catch { /* keep as is */ }
      }
      requestLog.push({
        time: new Date().toISOString(),
        method: ctx.method,
        content_type: ctx.get('content-type') || undefined,
        authorization: decodeBasic(ctx.get('authorization') || undefined),
        // The full parsed form body, including params oidc-provider ignores (e.g. `audience`).
        form: ctx.oidc?.body ?? undefined,
        client_id: ctx.oidc?.client?.clientId,
        // What the request actually used. oidc-provider accepts client_secret_basic and
        // client_secret_post interchangeably for a client registered with either one.
        auth_used: authUsed(ctx),
        client_registered_auth_method: ctx.oidc?.client?.clientAuthMethod,
        status: ctx.status,
        response: body,
        error_detail: ctx.state.tokenErrorDetail,
      });
    }
  });

  handler = provider.callback();
  process.stdout.write(`listening ${issuer}\n`);
});

function shutdown() {
  server.close();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
if (!ignoreStdin) {
  process.stdin.on('end', shutdown);
  process.stdin.on('close', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}
