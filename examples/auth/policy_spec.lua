-- examples/auth/policy.lua: Basic (htpasswd, bcrypt) and Bearer (token
-- digests) client authentication, credential sets, and the log hook, run
-- by the server's own code (testing.policy) with examples/auth/config.json.
local testing = require "regfacade.testing"

local DIR = "examples/auth"

local function basic(user, password, ip)
    return testing.request { repository = "library/alpine",
                             client = { ip = ip or "10.0.0.1", user = user, password = password } }
end

-- The shipped config, with credential set "ci" on the upstream (its
-- password in a file of the spec's own) and the options a test needs.
local function load(extra)
    local password_file = os.tmpname()
    local f = assert(io.open(password_file, "w"))
    f:write("upstream-password\n")
    f:close()
    local options = { htpasswd = "htpasswd", tokens = "tokens", credentials = { ["ci-bot"] = "ci" }, max_failures = 3 }
    for k, v in pairs(extra or {}) do
        options[k] = v
    end
    local config = testing.json.decode(io.open(DIR .. "/config.json"):read("a"))
    config.policy.file = nil
    config.upstreams.hub.credentials = { ci = { username = "ci", password_file = password_file } }
    config.default_upstream = "hub"
    local p = testing.policy(DIR .. "/policy.lua", { config = config, options = options })
    os.remove(password_file) -- read when the config loaded
    return p
end

describe("examples/auth/policy.lua", function()
    local policy

    before_each(function()
        policy = load()
    end)

    after_each(function()
        policy:close()
    end)

    it("asks for credentials with a Basic challenge", function()
        local a = policy:authorize(testing.request { kind = "ping", repository = nil, client = { ip = "10.0.0.1" } })
        assert.are.same({ allowed = false, status = 401, code = "UNAUTHORIZED", message = "authentication required",
                          challenge = 'Basic realm="regfacade"' }, a)
    end)

    it("lets a right password in, its user in req.ctx for the next hooks", function()
        local req = basic("alice", "alice-password")
        local a = policy:authorize(req)
        assert.is_true(a.allowed)
        assert.are.equal("alice", req.ctx.user)
        assert.is_nil(a.credentials)
        -- the second time the remembered digest answers (the same result)
        assert.is_true(policy:authorize(basic("alice", "alice-password")).allowed)
    end)

    it("answers a wrong password with 401 again, and too many with 429", function()
        -- an address of its own: regfacade.shared is one per process (as in
        -- the server), so a policy another spec left open shares it
        local ip = "10.0.0.3"
        for _ = 1, 3 do
            local a = policy:authorize(basic("alice", "nope", ip))
            assert.are.equal(401, a.status)
            assert.are.equal("wrong user name or password", a.message)
        end
        local a = policy:authorize(basic("alice", "alice-password", ip))
        assert.are.equal(429, a.status)
        assert.is_true(a.retry_after >= 1 and a.retry_after <= 60, tostring(a.retry_after))
        assert.are.equal("TOOMANYREQUESTS", a.code)
        -- another address is not affected
        assert.is_true(policy:authorize(basic("alice", "alice-password", "10.0.0.2")).allowed)
        -- nor another user from the same address
        assert.is_true(policy:authorize(basic("bob", "bob-password", ip)).allowed)
    end)

    it("refuses an unknown user", function()
        assert.are.equal(401, policy:authorize(basic("mallory", "alice-password")).status)
    end)

    it("maps a Bearer token to its name and credential set, which resolve uses", function()
        local req = testing.request { client = { token = "example-ci-token" } }
        local a = policy:authorize(req)
        assert.is_true(a.allowed)
        assert.are.equal("ci", a.credentials)
        assert.are.equal("ci-bot", req.ctx.user)
        local r = policy:resolve(req)
        assert.are.same({ "hub", "ci", "library/alpine" }, { r.upstream, r.credentials, r.repository })
        local bad = policy:authorize(testing.request { client = { token = "guess" } })
        assert.are.same({ 401, "unknown token" }, { bad.status, bad.message })
    end)

    it("lets anonymous requests through when the options say so", function()
        policy:close()
        policy = load({ anonymous = true })
        assert.is_true(policy:authorize(testing.request { client = {} }).allowed)
    end)

    it("resolves like the mirror", function()
        local r = policy:resolve(testing.request { repository = "alpine" })
        assert.are.same({ "hub", "library/alpine", "latest" }, { r.upstream, r.repository, r.reference })
    end)

    it("logs who pulled what", function()
        local req = basic("alice", "alice-password")
        local a = policy:authorize(req)
        assert.is_true(a.allowed, a.message)
        policy:log(req, { status = 200, bytes = 1234 }) -- its errors would be logged, not raised: it runs
    end)
end)
