-- testing.policy: the server's own code behind a spec (regfacade.policy):
-- the sandbox's budgets and phase checks always on, the server's readers
-- and validation of every answer, its config loader.
local testing = require "regfacade.testing"

local function policy_file(text)
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
    return path
end

local function load(text, opts)
    local path = policy_file(text)
    local ok, p = pcall(testing.policy, path, opts)
    os.remove(path)
    if not ok then
        error(p, 0)
    end
    return p
end

local function raises(pattern, fn, ...)
    local ok, err = pcall(fn, ...)
    assert.is_false(ok, "expected an error matching " .. pattern)
    assert.matches(pattern, tostring(err), 1, true)
end

describe("testing.policy", function()
    it("checks its options and the policy as the server loads it (FILE:LINE)", function()
        raises('testing.policy: unknown option "confg"', testing.policy, "x.lua", { confg = {} })
        raises(":3: <name> or '...' expected", load, "local x = 1\nreturn {\n resolve = function( end }\n")
        raises("hook", load, "return { resolve = 42 }")
        raises("default_upstream", load, "return {}", { config = { upstreams = { a = { url = "http://127.0.0.1:1" } },
                                                                  default_upstream = "b" } })
    end)

    it("runs hooks under the server's budgets: a loop is the 500 the server answers", function()
        local p = load("return { resolve = function(req) while true do end end }")
        raises("the server answers 500 UNKNOWN: the policy's resolve hook exceeded its instruction budget",
            p.resolve, p, testing.request())
    end)

    it("checks phases as the server does: crypt_verify in resolve fails", function()
        local p = load([[
local rf = require "regfacade"
return {
  authorize = function(req) return rf.crypt_verify("a", "not a hash") == false end,
  resolve = function(req) rf.crypt_verify("a", "b"); return {} end,
}]])
        assert.is_true(p:authorize(testing.request()).allowed) -- allowed in authorize
        raises("the server answers 500", p.resolve, p, testing.request())
    end)

    it("validates resolve's answer as the server does", function()
        local p = load([[
return { resolve = function(req)
  if req.repository == "a/up" then return { upstream = "nope" } end
  if req.repository == "a/name" then return { repository = "UPPER/case" } end
  if req.repository == "a/set" then return { credentials = "nope" } end
  if req.repository == "a/layers" then return { layers = { "base", { file = 3 } } } end
  return { reference = "v2" }
end }]])
        raises('upstream "nope", which is not configured', p.resolve, p, testing.request { repository = "a/up" })
        raises('invalid repository "UPPER/case"', p.resolve, p, testing.request { repository = "a/name" })
        raises('credential set "nope"', p.resolve, p, testing.request { repository = "a/set" })
        raises("layers[2]", p.resolve, p, testing.request { repository = "a/layers" })
        local r = p:resolve(testing.request { repository = "a/ok" })
        assert.are.same({ "hub", "a/ok", "v2", "[]" }, { r.upstream, r.repository, r.reference, r.fingerprint })
    end)

    it("reads every refusal form with the server's reader", function()
        local p = load([[
local rf = require "regfacade"
return { authorize = function(req)
  if req.repository == "a/old" then return false, "go away" end
  if req.repository == "a/table" then return { status = 401 } end
  if req.repository == "a/bad" then return { status = 99 } end
  return rf.deny(429, "TOOMANYREQUESTS", "later", { retry_after = 5 })
end }]])
        assert.are.same({ allowed = false, status = 403, code = "DENIED", message = "go away" },
            p:authorize(testing.request { repository = "a/old" }))
        local t = p:authorize(testing.request { repository = "a/table" })
        assert.are.same({ 401, "UNAUTHORIZED" }, { t.status, t.code })
        assert.is_string(t.challenge)
        raises("malformed refusal", p.authorize, p, testing.request { repository = "a/bad" })
        assert.are.same({ allowed = false, status = 429, code = "TOOMANYREQUESTS", message = "later", retry_after = 5 },
            p:authorize(testing.request { repository = "a/x" }))
    end)

    it("carries req.ctx and authorize's credential set to the next hook, as the server does", function()
        local secret = policy_file("upstream-secret\n")
        local p = load([[
return {
  authorize = function(req) req.ctx.who = "ci"; return { credentials = "ci" } end,
  resolve = function(req) return { repository = "seen/" .. req.ctx.who } end,
}]], { config = { upstreams = { hub = { url = "http://127.0.0.1:1",
                                         credentials = { ci = { username = "u", password_file = secret } } } } } })
        os.remove(secret)
        local req = testing.request()
        assert.are.same({ allowed = true, credentials = "ci" }, p:authorize(req))
        assert.are.same({ who = "ci" }, req.ctx)
        local r = p:resolve(req)
        assert.are.same({ "hub", "ci", "seen/ci" }, { r.upstream, r.credentials, r.repository })
    end)

    it("assembles and rewrites as serve does; an image left alone keeps its bytes", function()
        local p = load([[
local image = require "regfacade.image"
return {
  resolve = function(req) return { layers = { "base", "extra" } } end,
  rewrite = function(img, req) image.env_set(img.config, "X", "1") end,
}]])
        local base = testing.oci_image { layers = 1 }
        local out = p:run(testing.request { repository = "a/b" }, base, { extra = testing.layer("extra") })
        assert.are.equal(2, #out.manifest.layers)
        assert.are.equal("1", testing.env_value(out.config, "X"))
        assert.are.equal(testing.core.digest(out.manifest_text), out.manifest_digest)
        assert.are.equal(out.config_digest, out.manifest.config.digest)
        assert.is_false(out.unchanged)
        local plain = load("return {}"):run(testing.request(), base)
        assert.is_true(plain.unchanged)
        assert.are.same({ base.manifest_text, base.digest }, { plain.manifest_text, plain.manifest_digest })
    end)

    it("gives a rewrite refusal as the client gets it", function()
        local p = load([[
local rf = require "regfacade"
return { rewrite = function(img, req) return rf.deny(403, "DENIED", "not this one") end }]])
        local out, refusal = p:run(testing.request(), testing.oci_image {})
        assert.is_nil(out)
        assert.are.same({ false, 403, "DENIED", "not this one" },
            { refusal.allowed, refusal.status, refusal.code, refusal.message })
    end)
end)
