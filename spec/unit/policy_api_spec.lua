-- The `regfacade` module a policy requires (src/lua_regfacade.c), in the
-- server's sandbox: what each function returns, and the hooks it may be
-- called from ("X cannot be called in hook Y").
local testing = require "regfacade.testing"

local HTPASSWD_ALICE = "$2y$05$xf80luoU5Ww6OhlO6p4KcutiF9PCRUvaxAQbJg9YYmhuMdC8j7dK2" -- alice-password

local function hooks_calling(expr)
    local body = "function(req) return " .. expr .. " end"
    return testing.sandbox { source = "local rf = require 'regfacade'\nreturn { self_check = " .. body
        .. ", authorize = " .. body .. ", spec = " .. body .. ", resolve = " .. body .. ", rewrite = " .. body
        .. ", log = " .. body .. " }" }
end

describe("require 'regfacade'", function()
    it("config: upstreams, default_upstream, options, read-only", function()
        local sb = testing.sandbox {
            config = { upstreams = { hub = { url = "https://registry-1.docker.io", host = "registry-1.docker.io:443",
                                             library_prefix = true, credentials = { "ci" } } },
                       default_upstream = "hub", options = { a = { 1, 2 } } },
            source = [[local rf = require "regfacade"
                return { resolve = function(req)
                    return { rf.config.default_upstream, rf.config.upstreams.hub.url, rf.config.options.a[2],
                             rf.config.upstreams.hub.credentials[1], rf.version ~= nil }
                end }]] }
        assert.are.same({ true, { "hub", "https://registry-1.docker.io", 2, "ci", true } },
            { sb:call("resolve", {}) })
    end)

    it("digest: sha256 of a string", function()
        local sb = hooks_calling("rf.digest('')")
        assert.are.same({ true, "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" },
            { sb:call("resolve", {}) })
    end)

    it("json and null: the server's codec", function()
        local sb = hooks_calling("rf.json.encode({ rf.null, 1 })")
        assert.are.same({ true, "[null,1]" }, { sb:call("log", {}) })
    end)

    it("phase(): the running hook", function()
        local sb = hooks_calling("rf.phase()")
        for _, h in ipairs { "authorize", "spec", "resolve", "rewrite", "log" } do
            assert.are.same({ true, h }, { sb:call(h, {}) })
        end
    end)

    describe("crypt_verify", function()
        it("checks bcrypt hashes as htpasswd -B writes them", function()
            local sb = hooks_calling("{ rf.crypt_verify('alice-password', '" .. HTPASSWD_ALICE .. "'), "
                .. "rf.crypt_verify('wrong', '" .. HTPASSWD_ALICE .. "'), rf.crypt_verify('x', 'not a hash'), "
                .. "rf.crypt_verify('x', '') }")
            assert.are.same({ true, { true, false, false, false } }, { sb:call("authorize", {}) })
            assert.are.same({ true, { true, false, false, false } }, { sb:call("self_check", {}) })
        end)

        it("cannot be called in hooks other than authorize and self_check", function()
            local sb = hooks_calling("rf.crypt_verify('a', '" .. HTPASSWD_ALICE .. "')")
            for _, h in ipairs { "spec", "resolve", "rewrite", "log" } do
                local ok, _, msg = sb:call(h, {})
                assert.is_false(ok)
                assert.matches("regfacade.crypt_verify cannot be called in hook " .. h
                    .. " %(only in: self_check, authorize%)", msg)
            end
        end)

        it("the C function, from busted", function()
            assert.is_true(require("regfacade.sandbox").crypt_verify("alice-password", HTPASSWD_ALICE))
        end)
    end)

    describe("shared writes", function()
        it("work in every hook", function()
            local sb = hooks_calling("rf.shared.incr('n', 1, 0)")
            local n = 0
            for _, h in ipairs { "self_check", "authorize", "spec", "resolve", "rewrite", "log" } do
                n = n + 1
                assert.are.same({ true, n }, { sb:call(h, {}) })
            end
        end)
    end)

    describe("read_file", function()
        it("reads allowed data files only", function()
            local sb = testing.sandbox { data_dir = "examples", base_dir = ".",
                source = [[local rf = require "regfacade"
                return { resolve = function(req) return #rf.read_file(req.repository) > 0 end }]] }
            assert.are.same({ true, true }, { sb:call("resolve", { repository = "examples/auth/tokens" }) })
            local ok, _, msg = sb:call("resolve", { repository = "examples/../Makefile" })
            assert.is_false(ok)
            assert.matches("not a data file", msg)
            ok, _, msg = sb:call("resolve", { repository = "examples/auth" })
            assert.is_false(ok)
            assert.matches("not a regular file", msg)
        end)
    end)
end)

-- regfacade.deny (src/lua_deny.c): the one refusal every hook returns, and
-- how regfacade.testing reads it.
describe("regfacade.deny", function()
    it("is the same value from authorize, spec, resolve and rewrite", function()
        local sb = hooks_calling("rf.deny(429, 'TOOMANYREQUESTS', 'slow down', { retry_after = 30 })")
        for _, h in ipairs { "authorize", "spec", "resolve", "rewrite" } do
            assert.are.same({ true, { deny = true, status = 429, code = "TOOMANYREQUESTS", message = "slow down",
                                      retry_after = 30 } }, { sb:call(h, {}) }, h)
        end
    end)

    it("reads like a table and cannot be changed", function()
        local sb = hooks_calling([[(function()
            local d = rf.deny(401, nil, nil, { challenge = 'Bearer realm="x"' })
            local ok, err = pcall(function() d.status = 200 end)
            return { d.status, d.code, d.message, d.challenge, d.retry_after == nil, ok, err,
                     getmetatable(d), tostring(d) }
        end)()]])
        local ok, got = sb:call("resolve", {})
        assert.is_true(ok, got)
        assert.are.same({ 401, "UNAUTHORIZED", "authentication required", 'Bearer realm="x"', true, false }, {
            got[1], got[2], got[3], got[4], got[5], got[6] })
        assert.matches("read%-only", got[7])
        assert.are.equal(false, got[8])
        assert.are.equal("regfacade.deny(401 UNAUTHORIZED: authentication required)", got[9])
    end)

    it("fills in what is left out: the code by status, a 401's challenge", function()
        local sb = hooks_calling("{ rf.deny(404).code, rf.deny(429).code, rf.deny(403).code, rf.deny(401).challenge,"
            .. " rf.deny(403).challenge == nil }")
        assert.are.same({ true, { "NAME_UNKNOWN", "TOOMANYREQUESTS", "DENIED", 'Basic realm="regfacade"', true } },
            { sb:call("authorize", {}) })
    end)

    it("refuses what no client could be sent, with a clear error", function()
        local cases = {
            ["rf.deny(200)"] = "status 200 is not a refusal %(an integer from 400 to 599%)",
            ["rf.deny(600)"] = "status 600 is not a refusal",
            ["rf.deny(403.5)"] = "status must be an integer from 400 to 599, got a number with a fraction",
            ["rf.deny('403')"] = "status must be an integer",
            ["rf.deny(403, 'NOPE')"] = 'code "NOPE" is not an OCI error code %(one of: BLOB_UNKNOWN',
            ["rf.deny(429, nil, nil, { retry_after = -1 })"] = "retry_after %-1 is not a number of seconds",
            ["rf.deny(429, nil, nil, { retry_after = 1.5 })"] = "retry_after must be an integer",
            ["rf.deny(429, nil, nil, { retry = 1 })"] = 'unknown option "retry"',
            ["rf.deny(401, nil, nil, { challenge = 'a\\r\\nSet-Cookie: x' })"] = "challenge must be a WWW%-Authenticate value: not empty, under 500 bytes, no control characters",
            ["rf.deny(403, nil, string.rep('x', 1001))"] = "message is 1001 bytes, more than 1000",
        }
        for expr, want in pairs(cases) do
            local sb = hooks_calling(expr)
            local ok, outcome, msg = sb:call("authorize", {})
            assert.is_false(ok, expr)
            assert.are.equal("error", outcome, expr)
            assert.matches("regfacade.deny: " .. want, msg, 1, false, expr)
        end
    end)

    it("cannot be called in the log hook (the answer is gone by then)", function()
        local sb = hooks_calling("rf.deny(403)")
        local ok, outcome, msg = sb:call("log", {})
        assert.is_false(ok)
        assert.are.equal("error", outcome)
        assert.matches("regfacade.deny cannot be called in hook log %(only in: load, self_check, authorize, spec, "
            .. "resolve, rewrite%)", msg)
    end)

    it("is read with the older forms by one reader (sandbox.refusal)", function()
        local sandbox = require "regfacade.sandbox"
        assert.are.same({ deny = true, status = 404, code = "NAME_UNKNOWN", message = "gone" },
            sandbox.refusal("gone"))
        assert.are.same({ deny = true, status = 403, code = "DENIED", message = "no", retry_after = 5 },
            sandbox.refusal({ status = 403, message = "no", retry_after = 5 }))
        assert.are.same({ deny = true, status = 401, code = "UNAUTHORIZED", message = "authentication required",
                          challenge = 'Basic realm="regfacade"' }, sandbox.refusal({ status = 401 }))
        local none, why = sandbox.refusal({ status = 403, code = "FORBIDDEN" })
        assert.is_nil(none)
        assert.matches('code "FORBIDDEN" is not an OCI error code', why)
        none, why = sandbox.refusal({ status = "403" })
        assert.is_nil(none)
        assert.matches("status must be an integer from 400 to 599, got string", why)
    end)
end)

describe("regfacade.testing and regfacade.deny", function()
    before_each(function()
        testing.host {}
    end)
    after_each(testing.reset)

    it("testing.authorize reads a deny value with the server's reader (testing.policy)", function()
        local path = os.tmpname()
        local f = assert(io.open(path, "w"))
        f:write([[
local rf = require "regfacade"
return { authorize = function(req)
    if req.repository == "a/slow" then
        return rf.deny(429, "TOOMANYREQUESTS", "slow down", { retry_after = 30 })
    end
    return false, rf.deny(401, nil, "who are you", { challenge = 'Basic realm="x"' })
end }]])
        f:close()
        local policy = testing.policy(path)
        os.remove(path)
        local a = testing.authorize(policy, testing.request { repository = "a/slow" })
        assert.are.same({ false, 429, "TOOMANYREQUESTS", "slow down", 30 },
            { a.allowed, a.status, a.code, a.message, a.retry_after })
        a = testing.authorize(policy, testing.request { repository = "a/other" })
        assert.are.same({ false, 401, "UNAUTHORIZED", "who are you", 'Basic realm="x"' },
            { a.allowed, a.status, a.code, a.message, a.challenge })
        -- a table of hooks is not how the server runs a policy: refused, with the way that is
        local ok, err = pcall(testing.authorize, { authorize = function() return true end })
        assert.is_false(ok)
        assert.matches("testing.policy", err, 1, true)
    end)

    it("testing.run gives nil and the refusal of resolve or rewrite", function()
        local rf = require "regfacade"
        local base = testing.oci_image { layers = 1 }
        local out, refusal = testing.run({ resolve = function() return rf.deny(404, "MANIFEST_UNKNOWN", "no") end },
            nil, base)
        assert.is_nil(out)
        assert.are.same({ 404, "MANIFEST_UNKNOWN", "no" }, { refusal.status, refusal.code, refusal.message })
        out, refusal = testing.run({ rewrite = function() return rf.deny(403, nil, "not this image") end }, nil, base)
        assert.is_nil(out)
        assert.are.same({ 403, "DENIED", "not this image" }, { refusal.status, refusal.code, refusal.message })
    end)
end)
