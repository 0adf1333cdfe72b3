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
                local ok, outcome, msg = sb:call(h, {})
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
