-- layer_for_some.lua run by the server's code (testing.policy) with
-- layer_for_some.json; the tools layer's content is the spec's fixture.
local testing = require "regfacade.testing"

describe("examples/recipes/layer_for_some.lua", function()
    it("adds the tools layer and PATH for listed repositories only", function()
        local policy = testing.policy("examples/recipes/layer_for_some.lua",
                                      { config = "examples/recipes/layer_for_some.json" })
        local base = testing.oci_image { layers = 2 }
        local tools = { tools = testing.layer("tools") }
        local out = policy:run(testing.request { repository = "acme/app" }, base, tools)
        assert.are.equal(3, #out.manifest.layers)
        assert.are.equal(tools.tools.digest, out.manifest.layers[3].digest)
        assert.matches("^PATH=/opt/tools/bin:", out.config.config.Env[1])
        -- another repository: the upstream's own bytes and digest
        local plain = policy:run(testing.request { repository = "other/app" }, base, tools)
        assert.is_true(plain.unchanged)
        assert.are.equal(base.manifest_text, plain.manifest_text)
        assert.are.equal(base.digest, plain.manifest_digest)
    end)
end)
