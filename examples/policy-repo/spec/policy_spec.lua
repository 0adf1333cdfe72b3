-- spec/policy_spec.lua: run with `regfacade-busted` in this folder. The
-- policy runs through regfacade's own code (testing.policy): its sandbox,
-- its readers of each hook's answer, and config.json as `serve` loads it.
local testing = require "regfacade.testing"

-- This folder, wherever busted runs from.
local HERE = (debug.getinfo(1, "S").source:match("^@(.*)/spec/[^/]*$") or ".") .. "/"

local function load(allow)
    return testing.policy(HERE .. "policy.lua", { config = HERE .. "config.json", options = { allow = allow } })
end

describe("policy.lua", function()
    it("lets the allowed prefixes through", function()
        local policy = load { "acme/" }
        assert.is_true(policy:authorize(testing.request { repository = "acme/app" }).allowed)
        assert.is_true(policy:authorize(testing.request { kind = "ping" }).allowed)
    end)

    it("lets the catalog as a whole be listed, and filters its names", function()
        local policy = load { "acme/" }
        -- /v2/_catalog asks once with no repository, then once per cached name
        assert.is_true(policy:authorize(testing.request { kind = "catalog" }).allowed)
        assert.is_true(policy:authorize(testing.request { kind = "catalog", repository = "acme/app" }).allowed)
        assert.is_false(policy:authorize(testing.request { kind = "catalog", repository = "secret/app" }).allowed)
    end)

    it("refuses everything else with 403 DENIED, under every name form", function()
        local policy = load { "acme/" }
        for _, name in ipairs { "secret/app", "local/secret/app" } do
            local a = policy:authorize(testing.request { repository = name })
            assert.are.same({ false, 403, "DENIED" }, { a.allowed, a.status, a.code })
        end
    end)

    it("maps names to the configured upstream", function()
        local r = load({ "acme/" }):resolve(testing.request { repository = "acme/app", reference = "v1" })
        assert.are.same({ "local", "acme/app", "v1" }, { r.upstream, r.repository, r.reference })
    end)
end)
