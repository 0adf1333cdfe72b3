--[[
examples/auth/policy.lua: who may pull, checked by the facade itself.

Clients authenticate with HTTP Basic (docker login, containerd's hosts.toml
credentials, podman --creds: checked against an htpasswd file with bcrypt
hashes, as `htpasswd -B` writes them) or with a Bearer token (checked against
a list of token digests). No credentials, or wrong ones: 401 with a Basic
challenge, so clients ask for (or send) credentials. Too many wrong passwords
from one address: 429 for a while (bcrypt is slow on purpose; a guessing
client must not get the CPU).

A user or token name may be mapped to an upstream credential set
(config upstreams.NAME.credentials.SET): that client's pulls then go
upstream with that account. Client credentials themselves never go upstream.

Then a plain pull-through mirror (regfacade.mirror), and a log line per
response naming the client (the log hook).

Options (config "policy.options"; files relative to the config file, and
listed in "policy.data_files" so the policy may read them):
  htpasswd       htpasswd file (bcrypt: `htpasswd -Bbn NAME PASSWORD >> FILE`)
  tokens         token list: "sha256:<hex digest of the token> NAME" per line
  credentials    { NAME = SET }: the upstream credential set NAME pulls with
  anonymous      true: requests without credentials are let through
  realm          the Basic realm (default "regfacade")
  remember_seconds  how long a verified password is remembered (default 60;
                 as a digest in regfacade.shared, never the password)
  max_failures   wrong passwords per user and client address per minute
                 (default 20): one user's failures do not lock out another
                 user from the same address (every process on a node comes
                 from 127.0.0.1)
Tested by examples/auth/policy_spec.lua (busted), spec/integration/test_policy_sandbox.py
and spec/integration/test_examples.py (the real server). README.md: adding a user.
]]

local regfacade = require "regfacade"
local mirror = require "regfacade.mirror"

local function options()
    return regfacade.config.options
end

-- "name:hash" lines; comments (#) and blank lines skipped.
local function read_htpasswd(path)
    local users = {}
    for line in regfacade.read_file(path):gmatch("[^\r\n]+") do
        local user, hash = line:match("^([^:#%s][^:]*):(%S+)")
        if user then
            users[user] = hash
        end
    end
    return users
end

-- "sha256:<hex> NAME" lines.
local function read_tokens(path)
    local tokens = {}
    for line in regfacade.read_file(path):gmatch("[^\r\n]+") do
        local digest, name = line:match("^%s*(sha256:%x+)%s+(%S+)")
        if digest then
            tokens[digest:lower()] = name
        end
    end
    return tokens
end

local function challenge(message)
    return regfacade.deny(401, "UNAUTHORIZED", message,
                          { challenge = string.format('Basic realm="%s"', options().realm or "regfacade") })
end

-- Allowed as name: with its credential set when one is mapped.
local function grant(req, name)
    req.ctx.user = name
    local set = options().credentials and options().credentials[name]
    if set then
        return { credentials = set }
    end
    return true
end

local function password_ok(user, password)
    local hash = options().htpasswd and read_htpasswd(options().htpasswd)[user]
    if not hash then
        return false
    end
    -- A verified (user, password, hash) is remembered as a digest: bcrypt
    -- runs once per client and minute, not once per blob. A changed hash
    -- (new password, removed user) no longer matches.
    local key = "auth:" .. regfacade.digest(user .. "\0" .. password .. "\0" .. hash)
    if regfacade.shared.get(key) then
        return true
    end
    if not regfacade.crypt_verify(password, hash) then
        return false
    end
    regfacade.shared.set(key, true, options().remember_seconds or 60)
    return true
end

return {
    authorize = function(req)
        local client = req.client
        if client.token then
            local name = options().tokens and read_tokens(options().tokens)[regfacade.digest(client.token)]
            if name then
                return grant(req, name)
            end
            return challenge("unknown token")
        end
        if client.user then
            -- Counted per (address, user): a digest keeps the key short
            -- whatever the user name.
            local failures = "auth-failures:" .. regfacade.digest((client.ip or "?") .. "\0" .. client.user)
            if (regfacade.shared.get(failures) or 0) >= (options().max_failures or 20) then
                -- Retry-After: when the failure counter's minute is over.
                return regfacade.deny(429, "TOOMANYREQUESTS",
                                      "too many wrong passwords for this user from this address; try again in a minute",
                                      { retry_after = math.ceil(regfacade.shared.ttl(failures) or 60) })
            end
            if password_ok(client.user, client.password) then
                return grant(req, client.user)
            end
            regfacade.shared.incr(failures, 1, 0, 60)
            return challenge("wrong user name or password")
        end
        if options().anonymous then
            return true
        end
        return challenge("authentication required")
    end,

    resolve = function(req)
        return mirror.resolve(req)
    end,

    log = function(req, res)
        regfacade.log("info", string.format("pull by %s: %s %s %s -> %d (%d bytes)", req.ctx.user or "anonymous",
            req.method, req.kind or "-", req.repository or "/v2/", res.status, res.bytes))
    end,
}
