-- The assertion helpers of regfacade.testing.
local testing = require "regfacade.testing"

describe("regfacade.testing helpers", function()
    it("layer_digests lists a manifest's layer digests in order", function()
        local img = testing.oci_image { layers = 3 }
        local d = testing.layer_digests(img.manifest)
        assert.are.equal(3, #d)
        for i, l in ipairs(img.manifest.layers) do
            assert.are.equal(l.digest, d[i])
        end
        assert.are.same({}, testing.layer_digests { layers = {} })
    end)

    it("env_value reads one variable of an image config, exactly by name", function()
        local cfg = testing.oci_image { env = { "PATH=/bin:/usr/bin", "PATHX=no", "EMPTY=", "EQ=a=b" } }.config
        assert.are.equal("/bin:/usr/bin", testing.env_value(cfg, "PATH"))
        assert.are.equal("", testing.env_value(cfg, "EMPTY"))
        assert.are.equal("a=b", testing.env_value(cfg, "EQ"))
        assert.is_nil(testing.env_value(cfg, "PAT"))
        assert.is_nil(testing.env_value(cfg, "HOME"))
        assert.is_nil(testing.env_value({ config = {} }, "PATH"))
        assert.is_nil(testing.env_value({}, "PATH"))
    end)
end)
