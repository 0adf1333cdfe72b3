-- examples/workspace/policy.lua with the options of examples/workspace/config.json,
-- run by the server's own code (testing.policy: the sandbox, resolve's
-- reader and validation, then the assembly and rewrite `serve` runs).
local testing = require "regfacade.testing"

local ws = require "examples.workspace.spec_support"

local OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
local DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
local BASE_PATH = ws.BASE_PATH
local shipped = ws.shipped("config.json")
local plain, sources = ws.plain, ws.sources
local digests, env_value = testing.layer_digests, testing.env_value
local SUPERVISOR, IDE_ROOTFS, IDE = ws.SUPERVISOR, ws.IDE_ROOTFS, ws.IDE

local function config(options)
    return ws.config(shipped, options)
end

local function load_policy(cfg)
    return ws.load_policy("policy.lua", cfg or config())
end

local function non_empty(history)
    local n = 0
    for _, h in ipairs(history) do
        if h.empty_layer ~= true then
            n = n + 1
        end
    end
    return n
end

describe("examples/workspace/policy.lua", function()
    local policy

    before_each(function()
        policy = load_policy()
    end)

    after_each(function()
        policy:close()
    end)

    it("runs on Lua 5.4 and the shipped config passes its options", function()
        assert.are.equal("Lua 5.4", _VERSION)
        assert.are.equal("local/acme/app:1.0", shipped.policy.options.workspaces.demo.image)
        assert.are.equal("layers/supervisor.tar.gz", shipped.layers.supervisor.file)
    end)

    it("resolves a workspace to its base image, the supervisor and the IDE's layers", function()
        local d = testing.decision(policy:resolve(testing.request { repository = "remote/demo", reference = "latest" }))
        assert.are.same({
            upstream = "local",
            repository = "acme/app",
            reference = "1.0",
            layers = { "base", "supervisor",
                       { image = "local/acme/ide:1.2", skip = 1, created_by = "regfacade: IDE local/acme/ide:1.2" } },
        }, d)
    end)

    it("passes a digest through (the digest a tag answered)", function()
        local dg = "sha256:" .. string.rep("ab", 32)
        local d = policy:resolve(testing.request { repository = "remote/demo", reference = dg })
        assert.are.equal(dg, d.reference)
    end)

    it("refuses an unknown workspace with NAME_UNKNOWN and mirrors everything else", function()
        local refusal = policy:resolve(testing.request { repository = "remote/nope" })
        assert.are.same({ allowed = false, status = 404, code = "NAME_UNKNOWN", message = 'no workspace "nope"' },
            refusal)
        assert.are.same({ upstream = "local", repository = "acme/app", reference = "1.0" },
            testing.decision(policy:resolve(testing.request { repository = "local/acme/app", reference = "1.0" })))
    end)

    it("assembles base + supervisor + IDE (minus its first layer), PATH prepended, env modifiers applied", function()
        local base = testing.oci_image { layers = 2, empty_layers = 1, env = { "PATH=" .. BASE_PATH, "HOME=/root" } }
        local out = testing.run(policy, testing.request { repository = "remote/demo" }, base, sources())
        local want = digests(base.manifest)
        want[#want + 1] = SUPERVISOR.digest
        want[#want + 1] = IDE.digest
        assert.are.same(want, digests(out.manifest))
        for _, l in ipairs(out.manifest.layers) do
            assert.are.equal(OCI_GZIP, l.mediaType)
        end
        -- config follows: diff_ids, history (one entry per added layer, empty ones kept)
        assert.are.same({ base.config.rootfs.diff_ids[1], base.config.rootfs.diff_ids[2], SUPERVISOR.diff_id,
                          IDE.diff_id }, out.config.rootfs.diff_ids)
        assert.are.equal(#base.config.history + 2, #out.config.history)
        assert.are.equal(4, non_empty(out.config.history))
        assert.are.equal("regfacade: supervisor", out.config.history[#out.config.history - 1].created_by)
        assert.are.equal("regfacade: IDE local/acme/ide:1.2", out.config.history[#out.config.history].created_by)
        -- env_prepend first, then the IDE config's GITPOD_ENV_PREPEND_PATH; EDITOR set; HOME kept
        assert.are.equal("/ide/bin/remote-cli:/ide/bin:" .. BASE_PATH, env_value(out.config, "PATH"))
        assert.are.equal("/ide/bin/code", env_value(out.config, "EDITOR"))
        assert.are.same({ "PATH=/ide/bin/remote-cli:/ide/bin:" .. BASE_PATH, "HOME=/root", "EDITOR=/ide/bin/code" },
            out.config.config.Env)
        assert.are.equal("demo", out.manifest.annotations["io.regfacade.workspace.id"])
        assert.are.equal("local/acme/app:1.0", out.manifest.annotations["io.regfacade.workspace.image"])
        -- what the server will serve: the digest of these bytes
        assert.are.equal(testing.core.digest(out.manifest_text), out.manifest_digest)
        assert.are.equal(out.config_digest, out.manifest.config.digest)
    end)

    it("is deterministic: the same decision gives the same bytes", function()
        local base = testing.oci_image { layers = 1 }
        local a = testing.run(policy, testing.request { repository = "remote/demo" }, base, sources())
        local b = testing.run(load_policy(), testing.request { repository = "remote/demo" }, base, sources())
        assert.are.equal(a.manifest_text, b.manifest_text)
        assert.are.equal(a.config_text, b.config_text)
    end)

    it("keeps a Docker schema2 base Docker (added layers' media types converted)", function()
        local base = testing.docker_image { layers = 1, env = { "PATH=" .. BASE_PATH } }
        local out = testing.run(policy, testing.request { repository = "remote/demo" }, base, sources())
        assert.are.equal("application/vnd.docker.distribution.manifest.v2+json", out.manifest.mediaType)
        for _, l in ipairs(out.manifest.layers) do
            assert.are.equal(DOCKER_GZIP, l.mediaType)
        end
        assert.are.equal("/ide/bin/remote-cli:/ide/bin:" .. BASE_PATH, env_value(out.config, "PATH"))
        -- Docker's own config fields survive
        assert.are.equal("20.10.23", out.config.docker_version)
        assert.is_table(out.config.container_config)
    end)

    it("uses a workspace's own IDE, and an IDE without modifiers only gets PATH", function()
        local options = plain(shipped.policy.options)
        options.workspaces.other = { image = "local/acme/app:2.0", ide = "local/acme/ide-plain:3" }
        policy:close()
        policy = load_policy(config(options))
        local plain_ide = testing.layer { name = "plain ide", config = testing.oci_image {}.config }
        local base = testing.oci_image { layers = 1, env = { "PATH=/bin" } }
        local out = testing.run(policy, testing.request { repository = "remote/other" }, base,
            sources { ["local/acme/ide-plain:3"] = { IDE_ROOTFS, plain_ide } })
        assert.are.equal(plain_ide.digest, out.manifest.layers[#out.manifest.layers].digest)
        assert.are.same({ "PATH=/ide/bin:/bin" }, out.config.config.Env)
        assert.are.equal("2.0", out.decision.reference)
    end)

    it("leaves mirrored images exactly as they are", function()
        local base = testing.oci_image { layers = 2 }
        local out = testing.run(policy, testing.request { repository = "local/acme/app", reference = "1.0" }, base)
        assert.are.equal(base.manifest_text, out.manifest_text)
        assert.are.equal(base.digest, out.manifest_digest)
    end)
end)
