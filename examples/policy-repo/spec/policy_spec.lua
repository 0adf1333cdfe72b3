-- spec/policy_spec.lua: run with `regfacade-busted` in this folder.
local testing = require "regfacade.testing"

local CONFIG = {
    upstreams = { ["local"] = { url = "http://127.0.0.1:5001", host = "127.0.0.1:5001", library_prefix = false } },
    default_upstream = "local",
}

local function load(allow)
    testing.host { config = CONFIG, options = { allow = allow } }
    return testing.load_policy("policy.lua")
end

describe("policy.lua", function()
    after_each(testing.reset)

    it("lets the allowed prefixes through", function()
        local policy = load { "acme/" }
        assert.is_true(testing.authorize(policy, testing.request { repository = "acme/app" }).allowed)
        assert.is_true(testing.authorize(policy, testing.request { kind = "ping", repository = nil }).allowed)
    end)

    it("refuses everything else with 403 DENIED, under every name form", function()
        local policy = load { "acme/" }
        for _, name in ipairs { "secret/app", "local/secret/app" } do
            local a = testing.authorize(policy, testing.request { repository = name })
            assert.are.same({ false, 403, "DENIED" }, { a.allowed, a.status, a.code })
        end
    end)

    it("maps names to the configured upstream", function()
        local policy = load { "acme/" }
        assert.are.same({ upstream = "local", repository = "acme/app", reference = "v1" },
            policy.resolve(testing.request { repository = "acme/app", reference = "v1" }))
    end)
end)
