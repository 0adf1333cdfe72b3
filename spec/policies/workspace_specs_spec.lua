-- examples/workspace/policy_specs.lua (with examples/workspace/config_specs.json
-- and the spec examples/workspace/spec-ws-123.json), run the way the server
-- runs it: spec(req) names the spec, resolve(req, spec) decides, the
-- server's own assembly and rewrite code (regfacade.core) builds the image,
-- and rewrite sees the spec as req.spec. Specs are decoded with the
-- server's codec, so they have its shape (json.null, key order).
local testing = require "regfacade.testing"
local json = testing.json

local DIR = "examples/workspace/"
local BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

local function read(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("a")
    f:close()
    return s
end

local shipped = json.decode(read(DIR .. "config_specs.json"))
local SPEC_TEXT = read(DIR .. "spec-ws-123.json")

local function plain(v)
    if type(v) ~= "table" then
        return v
    end
    local t = {}
    for k, x in pairs(v) do
        t[k] = plain(x)
    end
    return t
end

local function config(options)
    return {
        upstreams = { ["local"] = { url = "http://127.0.0.1:5001", host = "127.0.0.1:5001", library_prefix = false } },
        default_upstream = "local",
        options = options or plain(shipped.policy.options),
    }
end

-- Loads the policy as the core does: a chunk that sees only what the
-- sandbox offers, so a stray global fails here.
local function load_policy(cfg)
    package.loaded["regfacade"] = { config = cfg or config(), null = json.null, log = function() end }
    for _, m in ipairs { "regfacade.mirror", "regfacade.image", "regfacade.specs" } do
        package.loaded[m] = nil
    end
    local env = { require = require, ipairs = ipairs, pairs = pairs, error = error, type = type,
                  tostring = tostring, string = string, table = table, getmetatable = getmetatable,
                  rawget = rawget, pcall = pcall }
    local chunk = assert(loadfile(DIR .. "policy_specs.lua", "t", env))
    return chunk()
end

-- What the server does around the hooks: the spec the spec hook named goes
-- to resolve as its second argument and to every hook as req.spec.
local function run(policy, req, spec, base, layers)
    req.spec = spec
    local server_side = {
        resolve = function(r) return policy.resolve(r, r.spec) end,
        rewrite = policy.rewrite,
    }
    return testing.run(server_side, req, base, layers)
end

local IDE_CONFIG = testing.oci_image {
    env = { "PATH=/bin", "GITPOD_ENV_SET_EDITOR=/ide/bin/code", "GITPOD_ENV_PREPEND_PATH=/ide/bin/remote-cli:" },
}.config
local SUPERVISOR = testing.layer { name = "supervisor", created_by = "regfacade: supervisor" }
local IDE_ROOTFS = testing.layer { name = "ide rootfs", config = IDE_CONFIG }
local IDE = testing.layer { name = "ide", config = IDE_CONFIG }
local SOURCES = { supervisor = SUPERVISOR, ["local/acme/ide:1.2"] = { IDE_ROOTFS, IDE } }

local function digests(m)
    local out = {}
    for i, l in ipairs(m.layers) do
        out[i] = l.digest
    end
    return out
end

local function env_value(cfg, name)
    for _, e in ipairs(cfg.config.Env or {}) do
        local v = e:match("^" .. name .. "=(.*)$")
        if v then
            return v
        end
    end
end

describe("examples/workspace/policy_specs.lua", function()
    local policy

    before_each(function()
        policy = load_policy()
    end)

    after_each(function()
        for _, m in ipairs { "regfacade", "regfacade.mirror", "regfacade.image", "regfacade.specs" } do
            package.loaded[m] = nil
        end
    end)

    it("has the spec, resolve and rewrite hooks, and the shipped config names its provider", function()
        assert.are.equal("Lua 5.4", _VERSION)
        assert.is_function(policy.spec)
        assert.is_function(policy.resolve)
        assert.is_function(policy.rewrite)
        assert.are.equal("pushed", shipped.specs.providers[shipped.policy.options.spec_provider].type)
    end)

    it("names the spec of names under remote/ and nothing else", function()
        assert.are.same({ provider = "workspaces", id = "ws-123" },
            policy.spec(testing.request { repository = "remote/ws-123" }))
        assert.are.same({ provider = "workspaces", id = "not-a-valid-image" },
            policy.spec(testing.request { repository = "remote/not-a-valid-image" }))
        assert.is_nil(policy.spec(testing.request { repository = "local/acme/app" }))
        assert.is_nil(policy.spec(testing.request { repository = "remote" }))
        local other = load_policy(config { spec_prefix = "ws/", spec_provider = "orchestrator" })
        assert.are.same({ provider = "orchestrator", id = "x" }, other.spec(testing.request { repository = "ws/x" }))
    end)

    it("mirrors names without a spec", function()
        assert.are.same({ upstream = "local", repository = "acme/app", reference = "1.0" },
            policy.resolve(testing.request { repository = "local/acme/app", reference = "1.0" }, nil))
    end)

    it("turns the example spec into its resolve answer", function()
        local spec = json.decode(SPEC_TEXT)
        local d = policy.resolve(testing.request { repository = "remote/ws-123" }, spec)
        assert.are.same({
            upstream = "local", repository = "acme/app", reference = "1.0",
            layers = { "base", "supervisor",
                       { image = "local/acme/ide:1.2", skip = 1, created_by = "regfacade: IDE acme/ide:1.2" } },
        }, d)
    end)

    it("assembles the example: base, supervisor, IDE; env from the IDE and the spec; annotations", function()
        local spec = json.decode(SPEC_TEXT)
        local base = testing.oci_image { layers = 2, env = { "PATH=" .. BASE_PATH, "HOME=/root" } }
        local out = run(policy, testing.request { repository = "remote/ws-123" }, spec, base, SOURCES)
        local want = digests(base.manifest)
        want[#want + 1] = SUPERVISOR.digest
        want[#want + 1] = IDE.digest
        assert.are.same(want, digests(out.manifest))
        assert.are.equal("/ide/bin:/ide/bin/remote-cli:" .. BASE_PATH, env_value(out.config, "PATH"))
        assert.are.equal("/ide/bin/code", env_value(out.config, "EDITOR"))
        assert.are.equal("ws-123", env_value(out.config, "WORKSPACE_ID"))
        assert.are.equal("/root", env_value(out.config, "HOME"))
        assert.are.equal("ws-123", out.config.config.Labels["io.example.workspace"])
        assert.are.equal("ws-123", out.manifest.annotations["io.regfacade.workspace.id"])
        assert.are.equal("local/acme/app:1.0", out.manifest.annotations["io.regfacade.workspace.image"])
        assert.are.equal(testing.core.digest(out.manifest_text), out.manifest_digest)
    end)

    it("is deterministic: the same spec text gives the same bytes", function()
        local base = testing.oci_image { layers = 1 }
        local a = run(policy, testing.request { repository = "remote/ws-123" }, json.decode(SPEC_TEXT), base, SOURCES)
        local b = run(load_policy(), testing.request { repository = "remote/ws-123" }, json.decode(SPEC_TEXT), base,
            SOURCES)
        assert.are.equal(a.manifest_text, b.manifest_text)
        assert.are.equal(a.config_text, b.config_text)
    end)

    it("prepends options.ide_bin when the spec says nothing about PATH", function()
        policy = load_policy(config { ide_bin = "/ide/bin" })
        local base = testing.oci_image { layers = 1, env = { "PATH=" .. BASE_PATH } }
        local spec = json.decode('{"base":"local/acme/app:1.0","env":null}')
        local out = run(policy, testing.request { repository = "remote/a" }, spec, base, SOURCES)
        assert.are.equal("/ide/bin:" .. BASE_PATH, env_value(out.config, "PATH"))
        spec = json.decode('{"base":"local/acme/app:1.0","env":{"PATH":"/only"}}')
        out = run(policy, testing.request { repository = "remote/a" }, spec, base, SOURCES)
        assert.are.equal("/only", env_value(out.config, "PATH"))
    end)

    it("builds a spec without base on the empty base and annotates no image", function()
        local specs = require "regfacade.specs"
        local spec = json.decode('{"base":null,"layers":["supervisor"],"env":{"PATH":"/.supervisor/bin"}}')
        local d = policy.resolve(testing.request { repository = "remote/bare" }, spec)
        assert.are.equal(specs.SCRATCH["linux/amd64"], d.reference)
        assert.are.same({ "supervisor" }, d.layers)
        local out = run(policy, testing.request { repository = "remote/bare" }, spec, testing.oci_image { layers = 0 },
            SOURCES)
        assert.are.same({ SUPERVISOR.digest }, digests(out.manifest))
        assert.is_nil(out.manifest.annotations["io.regfacade.workspace.image"])
        assert.are.equal("/.supervisor/bin", env_value(out.config, "PATH"))
    end)

    it("leaves mirrored images alone in rewrite", function()
        local base = testing.oci_image { layers = 1 }
        local out = run(policy, testing.request { repository = "local/acme/app" }, nil, base, SOURCES)
        assert.are.equal(base.manifest_text, out.manifest_text)
    end)
end)
