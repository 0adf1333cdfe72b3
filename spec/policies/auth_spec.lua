-- examples/auth/policy.lua: Basic (htpasswd, bcrypt) and Bearer (token
-- digests) client authentication, credential sets, and the log hook.
local testing = require "regfacade.testing"

local DIR = "examples/auth"

local function basic(user, password)
    return testing.request { repository = "library/alpine", client = { ip = "10.0.0.1", user = user, password = password } }
end

describe("examples/auth/policy.lua", function()
    local host, policy

    before_each(function()
        host = testing.host {
            options = { htpasswd = DIR .. "/htpasswd", tokens = DIR .. "/tokens", credentials = { ["ci-bot"] = "ci" },
                        max_failures = 3 },
            data_files = { DIR .. "/htpasswd", DIR .. "/tokens" },
        }
        host.phase_name = "authorize"
        policy = testing.load_policy(DIR .. "/policy.lua")
    end)

    after_each(testing.reset)

    it("asks for credentials with a Basic challenge", function()
        local a = testing.authorize(policy, testing.request { kind = "ping", repository = nil, client = { ip = "10.0.0.1" } })
        assert.are.same({ allowed = false, status = 401, code = "UNAUTHORIZED", message = "authentication required",
                          challenge = 'Basic realm="regfacade"', ctx = {} }, a)
    end)

    it("lets a right password in, and remembers it as a digest", function()
        local a = testing.authorize(policy, basic("alice", "alice-password"))
        assert.is_true(a.allowed)
        assert.are.equal("alice", a.ctx.user)
        assert.is_nil(a.credentials)
        -- the second time, no bcrypt: the remembered digest answers
        local verify = host.crypt_verify
        host.crypt_verify = function() error("bcrypt ran again") end
        assert.is_true(testing.authorize(policy, basic("alice", "alice-password")).allowed)
        host.crypt_verify = verify
    end)

    it("answers a wrong password with 401 again, and too many with 429", function()
        for _ = 1, 3 do
            local a = testing.authorize(policy, basic("alice", "nope"))
            assert.are.equal(401, a.status)
            assert.are.equal("wrong user name or password", a.message)
        end
        local a = testing.authorize(policy, basic("alice", "alice-password"))
        assert.are.equal(429, a.status)
        assert.is_true(a.retry_after >= 1 and a.retry_after <= 60, tostring(a.retry_after))
        assert.are.equal("TOOMANYREQUESTS", a.code)
        -- another address is not affected
        local other = basic("alice", "alice-password")
        other.client.ip = "10.0.0.2"
        assert.is_true(testing.authorize(policy, other).allowed)
    end)

    it("refuses an unknown user", function()
        assert.are.equal(401, testing.authorize(policy, basic("mallory", "alice-password")).status)
    end)

    it("maps a Bearer token to its name and credential set", function()
        local a = testing.authorize(policy, testing.request { client = { token = "example-ci-token" } })
        assert.is_true(a.allowed)
        assert.are.equal("ci", a.credentials)
        assert.are.equal("ci-bot", a.ctx.user)
        local bad = testing.authorize(policy, testing.request { client = { token = "guess" } })
        assert.are.same({ 401, "unknown token" }, { bad.status, bad.message })
    end)

    it("lets anonymous requests through when the options say so", function()
        host.config.options.anonymous = true
        assert.is_true(testing.authorize(policy, testing.request { client = {} }).allowed)
    end)

    it("resolves like the mirror", function()
        assert.are.same({ upstream = "hub", repository = "library/alpine", reference = "latest" },
            policy.resolve(testing.request { repository = "alpine" }))
    end)

    it("logs who pulled what, without secrets", function()
        local req = basic("alice", "alice-password")
        req.ctx.user = "alice"
        testing.log(policy, req, { status = 200, bytes = 1234 })
        assert.are.same({ { level = "info",
                            message = "pull by alice: GET manifest library/alpine -> 200 (1234 bytes)" } }, host.logs)
        assert.is_nil(host.logs[1].message:find("alice-password", 1, true))
    end)

    it("runs in the server's sandbox (bcrypt, data files, shared)", function()
        local sb = testing.sandbox { file = DIR .. "/policy.lua", base_dir = DIR,
            data_files = { "htpasswd", "tokens" },
            config = { upstreams = { hub = { url = "https://registry-1.docker.io" } }, default_upstream = "hub",
                       options = { htpasswd = "htpasswd", tokens = "tokens", credentials = { ["ci-bot"] = "ci" } } } }
        local ok, answer = sb:call("authorize", basic("bob", "bob-password"))
        assert.is_true(ok, answer)
        assert.is_true(answer)
        ok, answer = sb:call("authorize", testing.request { client = { token = "example-ci-token" } })
        assert.is_true(ok, answer)
        assert.are.same({ credentials = "ci" }, answer)
        local _, challenge = sb:call("authorize", basic("bob", "x"))
        assert.are.equal(401, challenge.status)
    end)
end)
