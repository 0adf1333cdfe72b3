-- regfacade.rules (lua/regfacade/rules.lua): matchers for allow-lists, name
-- wildcards and sets, in busted and in the server's sandbox.
local rules = require "regfacade.rules"
local testing = require "regfacade.testing"

describe("regfacade.rules", function()
    it("prefix: the first listed prefix the value starts with", function()
        local m = rules.prefix { "library/", "acme/", "acme/team/" }
        assert.are.equal("acme/", m("acme/team/app"))
        assert.are.equal("library/", m("library/alpine"))
        assert.is_nil(m("evil/acme/app"))
        assert.is_nil(m(nil))
        assert.is_nil(m(42))
        assert.are.equal("", rules.prefix { "" }("anything"))
        assert.is_nil(rules.prefix {}("x"))
    end)

    it("glob: * within a component, ** across them, ? one character, the rest literal", function()
        local m = rules.glob { "internal/*", "**/secret-*", "team-?/app", "a.b+c/%d" }
        assert.are.equal("internal/*", m("internal/app"))
        assert.is_nil(m("internal/a/b"))
        assert.are.equal("**/secret-*", m("x/y/secret-key"))
        assert.is_nil(m("secret-key"))
        assert.are.equal("team-?/app", m("team-a/app"))
        assert.is_nil(m("team-ab/app"))
        assert.is_nil(m("team-//app"))
        assert.are.equal("a.b+c/%d", m("a.b+c/%d"))
        assert.is_nil(m("aXb+c/%d"))
        assert.is_nil(m("xinternal/app"))
        assert.is_nil(m(nil))
    end)

    it("set: exact members", function()
        local m = rules.set { "alice", "bob" }
        assert.are.equal("alice", m("alice"))
        assert.is_nil(m("alice2"))
        assert.is_nil(m(nil))
    end)

    it("any: the first matcher that answers", function()
        local m = rules.any(rules.set { "acme/app" }, rules.prefix { "acme/" })
        assert.are.equal("acme/app", m("acme/app"))
        assert.are.equal("acme/", m("acme/other"))
        assert.is_nil(m("x"))
        assert.has_error(function() rules.any(rules.set {}, "x") end, "rules.any: argument 2 is a string, expected a matcher")
    end)

    it("says which entry of a list is wrong", function()
        assert.has_error(function() rules.prefix { "a/", 3 } end, "rules.prefix: entry 2 is a number, expected a string")
        assert.has_error(function() rules.glob("a/*") end, "rules.glob: expected a list of strings, got string")
        assert.has_error(function() rules.set { "a", nil, "c" } end)
    end)

    it("works in the server's sandbox on the config's read-only lists", function()
        local sb = testing.sandbox {
            config = { options = { allow = { "library/", "acme/" }, hide = { "**/internal-*" } } },
            source = [[
                local regfacade = require "regfacade"
                local rules = require "regfacade.rules"
                local allowed = rules.prefix(regfacade.config.options.allow)
                local hidden = rules.glob(regfacade.config.options.hide)
                return { authorize = function(req)
                    if hidden(req.repository) or not allowed(req.repository) then
                        return regfacade.deny(403, "DENIED", req.repository .. " is not served")
                    end
                    return true
                end }]] }
        assert.are.same({ true, true }, { sb:call("authorize", { repository = "acme/app" }) })
        local ok, d = sb:call("authorize", { repository = "acme/internal-app" })
        assert.is_true(ok)
        assert.are.same({ 403, "acme/internal-app is not served" }, { d.status, d.message })
        ok, d = sb:call("authorize", { repository = "evil/app" })
        assert.is_true(ok)
        assert.are.equal(403, d.status)
    end)
end)
