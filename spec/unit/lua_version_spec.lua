-- Policies run on Lua 5.4 in the C core; the specs must run on it too.
describe("the Lua running these specs", function()
    it("is Lua 5.4", function()
        assert.are.equal("Lua 5.4", _VERSION)
    end)

    it("finds the regfacade library in lua/", function()
        assert.truthy(package.searchpath("regfacade.mirror", package.path))
        assert.truthy(package.searchpath("regfacade.image", package.path))
    end)
end)
