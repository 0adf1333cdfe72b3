-- examples/recipes/*.lua: the cookbook of docs/policy.md, each recipe run
-- as the server runs it (and its layers through the server's assembly).
local testing = require "regfacade.testing"

local function load(name, options, config)
    local host = testing.host { options = options, config = config }
    return testing.load_policy("examples/recipes/" .. name .. ".lua"), host
end

describe("recipes", function()
    after_each(testing.reset)

    describe("allowlist.lua", function()
        it("lets listed prefixes through and refuses the rest before any upstream", function()
            local policy = load("allowlist", { allow = { "library/", "acme/" } })
            assert.is_true(testing.authorize(policy, testing.request { repository = "acme/app" }).allowed)
            assert.is_true(testing.authorize(policy, testing.request { repository = "alpine" }).allowed)
            assert.is_true(testing.authorize(policy, testing.request { kind = "ping", repository = nil }).allowed)
            local a = testing.authorize(policy, testing.request { repository = "evil/app" })
            assert.are.same({ false, 403, "DENIED", "evil/app is not on this mirror's allow-list" },
                { a.allowed, a.status, a.code, a.message })
        end)
    end)

    describe("pinned.lua", function()
        it("serves a pinned tag as its digest, other tags and digests unchanged", function()
            local pin = "sha256:" .. string.rep("a", 64)
            local policy = load("pinned", { pins = { ["library/alpine:3.20"] = pin } })
            assert.are.same({ upstream = "hub", repository = "library/alpine", reference = pin },
                policy.resolve(testing.request { repository = "alpine", reference = "3.20" }))
            assert.are.same({ upstream = "hub", repository = "library/alpine", reference = "3.19" },
                policy.resolve(testing.request { repository = "alpine", reference = "3.19" }))
            local blob = testing.request { kind = "blob", repository = "alpine", reference = pin }
            assert.are.equal(pin, policy.resolve(blob).reference)
        end)
    end)

    describe("layer_for_some.lua", function()
        it("adds the tools layer and PATH for listed repositories only", function()
            local policy = load("layer_for_some", { with_tools = { "acme/" } })
            local base = testing.oci_image { layers = 2 }
            local tools = { tools = testing.layer("tools") }
            local out = testing.run(policy, testing.request { repository = "acme/app" }, base, tools)
            assert.are.equal(3, #out.manifest.layers)
            assert.are.equal(tools.tools.digest, out.manifest.layers[3].digest)
            assert.matches("^PATH=/opt/tools/bin:", out.config.config.Env[1])
            local plain = testing.run(policy, testing.request { repository = "other/app" }, base, tools)
            assert.are.equal(2, #plain.manifest.layers)
            assert.are.equal(base.manifest_text, plain.manifest_text)
        end)
    end)

    describe("tenant_upstream.lua", function()
        it("picks the tenant's upstream and drops the tenant from the name", function()
            local policy = load("tenant_upstream", { tenants = { acme = "acme-registry" } })
            assert.are.same({ upstream = "acme-registry", repository = "team/app", reference = "v1" },
                policy.resolve(testing.request { repository = "acme/team/app", reference = "v1" }))
            local res, err = policy.resolve(testing.request { repository = "globex/app" })
            assert.is_nil(res)
            assert.are.equal(404, err.status)
        end)
    end)

    describe("ratelimit.lua", function()
        it("refuses the requests over the limit with 429, per client", function()
            local policy = load("ratelimit", { per_minute = 3 })
            local function as(user)
                return testing.request { client = { user = user, ip = "10.1.1.1" } }
            end
            for _ = 1, 3 do
                assert.is_true(testing.authorize(policy, as("alice")).allowed)
            end
            local a = testing.authorize(policy, as("alice"))
            assert.are.same({ 429, "TOOMANYREQUESTS" }, { a.status, a.code })
            assert.is_true(a.retry_after >= 1 and a.retry_after <= 60, tostring(a.retry_after))
            assert.is_true(testing.authorize(policy, as("bob")).allowed)
            assert.is_true(testing.authorize(policy, testing.request { kind = "ping", client = { user = "alice" } }).allowed)
        end)

        it("counts in the real sandbox too", function()
            local sb = testing.sandbox { file = "examples/recipes/ratelimit.lua",
                config = { upstreams = { hub = { url = "https://registry-1.docker.io" } }, default_upstream = "hub",
                           options = { per_minute = 2 } } }
            local req = testing.request { client = { ip = "10.9.9.9" } }
            assert.are.same({ true, true }, { sb:call("authorize", req) })
            assert.are.same({ true, true }, { sb:call("authorize", req) })
            local ok, answer = sb:call("authorize", req)
            assert.is_true(ok)
            assert.are.equal(429, answer.status)
            assert.is_true(answer.deny and answer.retry_after >= 1)
        end)
    end)

    it("every example policy loads in the server's sandbox", function()
        for _, f in ipairs { "allowlist", "pinned", "layer_for_some", "tenant_upstream", "ratelimit" } do
            testing.sandbox { file = "examples/recipes/" .. f .. ".lua" }
        end
        testing.sandbox { file = "examples/mirror.lua" }
        testing.sandbox { file = "examples/auth/policy.lua" }
    end)
end)
