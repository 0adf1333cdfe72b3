-- examples/workspace/policy_specs.lua (with examples/workspace/config_specs.json
-- and the spec examples/workspace/spec-ws-123.json), run by the server's
-- own code (testing.policy): spec(req) names the spec, resolve(req, spec)
-- decides (req.spec is what the server looked up), the assembly and
-- rewrite `serve` runs build the image, and rewrite sees the spec as
-- req.spec. Specs are decoded with the server's codec, so they have its
-- shape (json.null, key order).
local testing = require "regfacade.testing"
local json = testing.json

local ws = require "examples.workspace.spec_support"

local BASE_PATH = ws.BASE_PATH
local shipped = ws.shipped("config_specs.json")
local SPEC_TEXT = ws.read(ws.DIR .. "spec-ws-123.json")
local SOURCES = ws.sources()
local digests, env_value = testing.layer_digests, testing.env_value
local SUPERVISOR, IDE = ws.SUPERVISOR, ws.IDE

local function config(options)
    return ws.config(shipped, options)
end

local function load_policy(cfg)
    return ws.load_policy("policy_specs.lua", cfg or config())
end

-- The spec the spec hook named, as the server passes it on: resolve's
-- second argument and req.spec in every hook.
local function run(policy, req, spec, base, layers)
    req.spec = spec
    return policy:run(req, base, layers)
end

local function resolve(policy, req, spec)
    req.spec = spec
    return testing.decision(policy:resolve(req))
end

describe("examples/workspace/policy_specs.lua", function()
    local policy

    before_each(function()
        policy = load_policy()
    end)

    after_each(function()
        policy:close()
    end)

    it("has the spec, resolve and rewrite hooks, and the shipped config names its provider", function()
        assert.are.equal("Lua 5.4", _VERSION)
        assert.are.equal("pushed", shipped.specs.providers[shipped.policy.options.spec_provider].type)
    end)

    it("names the spec of names under remote/ and nothing else", function()
        assert.are.same({ provider = "workspaces", id = "ws-123" },
            policy:spec(testing.request { repository = "remote/ws-123" }))
        assert.are.same({ provider = "workspaces", id = "not-a-valid-image" },
            policy:spec(testing.request { repository = "remote/not-a-valid-image" }))
        assert.is_false(policy:spec(testing.request { repository = "local/acme/app" }))
        assert.is_false(policy:spec(testing.request { repository = "remote" }))
        local other = load_policy(config { spec_prefix = "ws/", spec_provider = "orchestrator" })
        assert.are.same({ provider = "orchestrator", id = "x" }, other:spec(testing.request { repository = "ws/x" }))
        other:close()
    end)

    it("mirrors names without a spec", function()
        assert.are.same({ upstream = "local", repository = "acme/app", reference = "1.0" },
            resolve(policy, testing.request { repository = "local/acme/app", reference = "1.0" }, nil))
    end)

    it("turns the example spec into its resolve answer", function()
        local spec = json.decode(SPEC_TEXT)
        local d = resolve(policy, testing.request { repository = "remote/ws-123" }, spec)
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
        policy:close()
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
        local d = resolve(policy, testing.request { repository = "remote/bare" }, spec)
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
