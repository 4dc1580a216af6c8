// A real OpenID provider for the tests: node_modules/oidc-provider (pinned in package.json).
//
// node oidc_provider.mjs <port> <config.json>
// config.json: {"clients": [{"client_id", "client_secret", "email", "groups", "ttl"}],
//               "keys_file": "<path of a JWK set to sign with; written if missing>"}
// Client-credentials grant only; access tokens are JWTs (RS256) whose audience is the
// requested resource indicator, with the client's email and groups as claims.
import { generateKeyPairSync } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const [port, configPath] = process.argv.slice(2);
const config = JSON.parse(readFileSync(configPath, 'utf8'));
const people = Object.fromEntries(config.clients.map((c) => [c.client_id, c]));

function signingKeys() {
  if (existsSync(config.keys_file)) return JSON.parse(readFileSync(config.keys_file, 'utf8'));
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = { ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256', kid: `k${Date.now()}` };
  const keys = { keys: [jwk] };
  writeFileSync(config.keys_file, JSON.stringify(keys));
  return keys;
}

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: config.clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
  })),
  jwks: signingKeys(),
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => undefined,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource, client) => ({
        scope: 'api',
        audience: resource,
        accessTokenTTL: people[client.clientId].ttl ?? 600,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  async extraTokenClaims(ctx, token) {
    const person = people[token.clientId];
    return person ? { email: person.email, groups: person.groups } : {};
  },
});
provider.listen(Number(port), '127.0.0.1');
