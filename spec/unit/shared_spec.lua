-- regfacade.shared (src/lua_shared.c): the C dictionary every Lua state of
-- the server shares, used here through regfacade.sandbox.shared (the same
-- code) and from inside the sandbox.
local testing = require "regfacade.testing"
local sandbox = require "regfacade.sandbox"

local function sleep(s)
    os.execute("sleep " .. s)
end

describe("regfacade.shared", function()
    local shared

    before_each(function()
        shared = sandbox.shared(64 * 1024)
    end)

    it("gets what was set: strings, integers, floats, booleans", function()
        assert.is_true(shared.set("s", "text\0with nul"))
        shared.set("i", 42)
        shared.set("f", 1.5)
        shared.set("b", false)
        assert.are.equal("text\0with nul", shared.get("s"))
        assert.are.equal(42, shared.get("i"))
        assert.are.equal(math.type(42), math.type(shared.get("i")))
        assert.are.equal(1.5, shared.get("f"))
        assert.are.equal(false, shared.get("b"))
        assert.is_nil(shared.get("absent"))
    end)

    it("works with method syntax too", function()
        shared:set("k", "v")
        assert.are.equal("v", shared:get("k"))
        assert.are.equal(1, shared:incr("n", 1, 0))
    end)

    it("set with nil and delete remove", function()
        shared.set("k", 1)
        shared.set("k", nil)
        assert.is_nil(shared.get("k"))
        shared.set("k", 1)
        shared.delete("k")
        assert.is_nil(shared.get("k"))
    end)

    it("add only when absent", function()
        assert.is_true(shared.add("k", 1))
        assert.are.same({ false, "exists" }, { shared.add("k", 2) })
        assert.are.equal(1, shared.get("k"))
    end)

    it("incr: atomic counter, with init and its TTL", function()
        assert.are.same({ nil, "not found" }, { shared.incr("c", 1) })
        assert.are.equal(5, shared.incr("c", 5, 0))
        assert.are.equal(7, shared.incr("c", 2))
        assert.are.equal(6.5, shared.incr("c", -0.5))
        shared.set("s", "x")
        assert.has_error(function() shared.incr("s", 1) end, "regfacade.shared.incr: the value is not a number")
        shared.set("max", math.maxinteger)
        assert.has_error(function() shared.incr("max", 1) end, "regfacade.shared.incr: integer overflow")
    end)

    it("expires entries after their TTL", function()
        shared.set("short", "x", 0.2)
        shared.set("long", "y", 60)
        shared.set("forever", "z")
        local left = shared.ttl("short")
        assert.is_true(left > 0 and left <= 0.2)
        assert.are.equal(0, shared.ttl("forever"))
        assert.is_nil(shared.ttl("absent"))
        sleep(0.3)
        assert.is_nil(shared.get("short"))
        assert.are.equal("y", shared.get("long"))
        assert.is_true(shared.add("short", "again"))
        shared.incr("window", 1, 0, 0.2)
        sleep(0.3)
        assert.are.equal(1, shared.incr("window", 1, 0, 0.2)) -- a new window
    end)

    it("keeps within its size cap, dropping the least recently used", function()
        local small = sandbox.shared(4096)
        for i = 1, 200 do
            small.set("key" .. i, string.rep("v", 40))
        end
        assert.is_true(small.used() <= 4096)
        assert.are.equal(4096, small.capacity())
        assert.is_nil(small.get("key1"))
        assert.is_not_nil(small.get("key200"))
        assert.has_error(function() small.set("big", string.rep("x", 5000)) end,
            "regfacade.shared.set: the entry is larger than the whole dictionary (policy.shared_bytes)")
    end)

    it("checks keys and values", function()
        assert.has_error(function() shared.set("", 1) end, "regfacade.shared.set: the key must be a string of 1 to 250 bytes")
        assert.has_error(function() shared.set(string.rep("k", 251), 1) end)
        assert.has_error(function() shared.set("k", {}) end,
            "regfacade.shared.set: the value must be a string, number or boolean, got table")
        assert.has_error(function() shared.set("k", 1, -1) end, "regfacade.shared.set: ttl must be a number of seconds >= 0")
    end)

    it("is the same dictionary for every state of a policy, and writable from hooks only", function()
        local sb = testing.sandbox { source = [[
            local shared = require("regfacade").shared
            local at_load = shared.get("x")
            return {
                resolve = function(req) return shared.incr("hits", 1, 0) end,
                authorize = function(req) return shared.get("hits") end,
            }]] }
        assert.are.same({ true, 1 }, { sb:call("resolve", {}) })
        assert.are.same({ true, 2 }, { sb:call("resolve", {}) })
        assert.are.same({ true, 2 }, { sb:call("authorize", {}) })
        assert.has_error(function()
            testing.sandbox { source = "require('regfacade').shared.set('x', 1) return {}" }
        end)
        local ok, err = pcall(testing.sandbox, { source = "require('regfacade').shared.incr('x', 1, 0) return {}" })
        assert.is_false(ok)
        assert.matches("regfacade.shared.incr cannot be called in the policy's top%-level code %(only in: "
            .. "self_check, authorize, spec, resolve, rewrite, log%)", err)
    end)
end)
