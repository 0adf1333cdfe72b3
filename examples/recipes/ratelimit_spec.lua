-- ratelimit.lua run by the server's code (testing.policy) with ratelimit.json.
local testing = require "regfacade.testing"

describe("examples/recipes/ratelimit.lua", function()
    local policy

    before_each(function()
        policy = testing.policy("examples/recipes/ratelimit.lua",
                                { config = "examples/recipes/ratelimit.json", options = { per_minute = 3 } })
    end)

    after_each(function()
        policy:close()
    end)

    it("refuses the requests over the limit with 429, per client", function()
        local function as(user)
            -- names of their own: regfacade.shared is one per process, as in the server
            return testing.request { client = { user = "ratelimit-spec-" .. user, ip = "10.1.1.1" } }
        end
        for _ = 1, 3 do
            assert.is_true(policy:authorize(as("alice")).allowed)
        end
        local a = policy:authorize(as("alice"))
        assert.are.same({ 429, "TOOMANYREQUESTS" }, { a.status, a.code })
        assert.is_true(a.retry_after >= 1 and a.retry_after <= 60, tostring(a.retry_after))
        assert.is_true(policy:authorize(as("bob")).allowed)
        assert.is_true(policy:authorize(testing.request { kind = "ping", client = { user = "ratelimit-spec-alice" } }).allowed)
    end)
end)
