-- pinned.lua run by the server's code (testing.policy) with pinned.json.
local testing = require "regfacade.testing"

describe("examples/recipes/pinned.lua", function()
    it("serves a pinned tag as its digest, other tags and digests unchanged", function()
        local pin = "sha256:" .. string.rep("a", 64)
        local policy = testing.policy("examples/recipes/pinned.lua", { config = "examples/recipes/pinned.json" })
        local r = policy:resolve(testing.request { repository = "alpine", reference = "3.20" })
        assert.are.same({ "hub", "library/alpine", pin }, { r.upstream, r.repository, r.reference })
        r = policy:resolve(testing.request { repository = "alpine", reference = "3.19" })
        assert.are.same({ "hub", "library/alpine", "3.19" }, { r.upstream, r.repository, r.reference })
        local blob = testing.request { kind = "blob", repository = "alpine", reference = pin }
        assert.are.equal(pin, policy:resolve(blob).reference)
    end)

    it("refuses a pin that is not a digest as the server does (a 500 is the spec's failure)", function()
        local policy = testing.policy("examples/recipes/pinned.lua", { config = "examples/recipes/pinned.json",
            options = { pins = { ["library/alpine:3.20"] = "not a digest" } } })
        local ok, err = pcall(policy.resolve, policy, testing.request { repository = "alpine", reference = "3.20" })
        assert.is_false(ok)
        assert.matches("the server answers 500 UNKNOWN: resolve returned an invalid reference", err, 1, true)
    end)
end)
