-- regfacade.json: the order-preserving codec policies share with the core
-- (src/lua_json.c over src/json.c), loaded through regfacade.core.
local testing = require "regfacade.testing"
local json = require "regfacade.json"

local function read(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("a")
    f:close()
    return s
end

describe("regfacade.json", function()
    it("is the same module as regfacade.core.json", function()
        assert.are.equal(testing.core.json, json)
        assert.are.equal(testing.json, json)
    end)

    describe("decode then encode", function()
        it("gives compact documents back byte for byte", function()
            for _, text in ipairs {
                '{"b":1,"a":[],"c":{"z":null,"y":true,"x":false}}',
                '[1,-2,"three",[],{},[[]],{"":""}]',
                '{"size":9007199254740993,"max":9223372036854775807,"min":-9223372036854775808}',
                '{"f":0.1,"g":-12.5,"h":1e3,"i":-0,"j":1.0,"k":1.50,"l":18446744073709551615,"m":1e400}',
                '"caf\xc3\xa9 \xe2\x98\x95 tab\\t nl\\n quote\\" nul\\u0000"',
                'null', 'true', '12',
            } do
                assert.are.equal(text, json.encode(json.decode(text)))
            end
        end)

        it("gives the compact fixtures back byte for byte", function()
            for _, name in ipairs { "oci_manifest", "oci_config" } do
                local text = read("spec/fixtures/" .. name .. ".json")
                assert.are.equal(text, json.encode(json.decode(text)))
            end
            -- Docker writes & as \u0026 (Go's HTML escaping); json.c writes
            -- it plainly, and that is the only difference.
            local text = read("spec/fixtures/docker_config.json")
            assert.are.equal((text:gsub("\\u0026", "&")), json.encode(json.decode(text)))
        end)

        it("drops whitespace and keeps order for a pretty document", function()
            local text = read("spec/fixtures/docker_manifest.json")
            local out = json.encode(json.decode(text))
            assert.are.equal(1, select(2, out:gsub('"schemaVersion":2,"mediaType":', "")))
            assert.is_nil(out:find("[\n ]"))
            assert.truthy(out:find('{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":29126484,',
                1, true))
        end)

        it("writes Go-escaped characters plainly (one codec: json.c)", function()
            assert.are.equal('"a&b<c>"', json.encode(json.decode('"a\\u0026b\\u003cc\\u003e"')))
        end)

        it("keeps strings with NUL bytes", function()
            local s = json.decode('"a\\u0000b"')
            assert.are.equal(3, #s)
            assert.are.equal('"a\\u0000b"', json.encode(s))
        end)
    end)

    describe("the Lua shape", function()
        it("marks objects with their key order and arrays as arrays", function()
            local v = json.decode('{"b":1,"a":[1,2],"c":{}}')
            assert.are.equal("object", getmetatable(v).__jsontype)
            assert.are.same({ "b", "a", "c" }, getmetatable(v).__jsonorder)
            assert.are.equal("array", getmetatable(v.a).__jsontype)
            assert.are.equal("object", getmetatable(v.c).__jsontype)
        end)

        it("compares as plain tables in busted", function()
            assert.are.same({ b = 1, a = { 1, 2 }, c = {} }, json.decode('{"b":1,"a":[1,2],"c":{}}'))
        end)

        it("gives integers and floats as JSON wrote them", function()
            local v = json.decode('[1,1.0,1e3,9007199254740993,-0]')
            assert.are.equal(math.type(v[1]), "integer")
            assert.are.equal(math.type(v[2]), "float")
            assert.are.equal(math.type(v[3]), "float")
            assert.are.equal(9007199254740993, v[4])
            assert.are.equal(math.type(v[4]), "integer")
            assert.are.equal(math.type(v[5]), "integer")
        end)

        it("keeps a duplicated key's last value, at its last place", function()
            local v = json.decode('{"a":1,"b":2,"a":3}')
            assert.are.equal(3, v.a)
            assert.are.same({ "b", "a" }, getmetatable(v).__jsonorder)
            assert.are.equal('{"b":2,"a":3}', json.encode(v))
        end)
    end)

    describe("null", function()
        it("is one light userdata everywhere", function()
            assert.are.equal("userdata", type(json.null))
            assert.are.equal(json.null, json.decode("null"))
            assert.are.equal(json.null, json.decode("[null]")[1])
            assert.are.equal(json.null, json.decode('{"a":null}').a)
            assert.are.equal(testing.core.json.null, json.null)
        end)

        it("keeps array length and encodes as null", function()
            local v = json.decode("[null,1,null]")
            assert.are.equal(3, #v)
            assert.are.equal("[null,1,null]", json.encode(v))
            assert.are.equal('{"a":null}', json.encode({ a = json.null }))
            assert.are.equal("null", json.encode(json.null))
        end)
    end)

    describe("empty containers", function()
        it("stay what they were", function()
            assert.are.equal("[]", json.encode(json.decode("[]")))
            assert.are.equal("{}", json.encode(json.decode("{}")))
            assert.are.equal('{"Env":[],"Labels":{}}', json.encode(json.decode('{"Env":[],"Labels":{}}')))
        end)

        it("stay arrays when emptied", function()
            local v = json.decode('{"Env":["A=1"]}')
            table.remove(v.Env, 1)
            assert.are.equal('{"Env":[]}', json.encode(v))
        end)

        it("are objects when plain, arrays when marked", function()
            assert.are.equal("{}", json.encode({}))
            assert.are.equal("[]", json.encode(json.array()))
            assert.are.equal("[]", json.encode(json.array({})))
            assert.are.equal("{}", json.encode(json.object()))
            assert.are.equal('{"a":[]}', json.encode({ a = json.array() }))
        end)
    end)

    describe("encode", function()
        it("writes recorded keys first, in order, then new keys bytewise", function()
            local v = json.decode('{"b":1,"a":2,"c":3}')
            v.c = nil
            v.z = 26
            v.B = 0
            v.aa = 4
            assert.are.equal('{"b":1,"a":2,"B":0,"aa":4,"z":26}', json.encode(v))
        end)

        it("sorts a plain table's keys bytewise", function()
            assert.are.equal('{"B":3,"a":2,"a b":4,"b":1,"\xc3\xa9":5}',
                json.encode({ b = 1, a = 2, B = 3, ["a b"] = 4, ["\xc3\xa9"] = 5 }))
        end)

        it("takes a key order from json.object", function()
            local t = json.object({ a = 1, z = 2, m = 3 }, { "z", "a", "z", "gone" })
            assert.are.equal('{"z":2,"a":1,"m":3}', json.encode(t))
        end)

        it("writes a plain sequence as an array, anything else as an object", function()
            assert.are.equal("[1,2,3]", json.encode({ 1, 2, 3 }))
            assert.are.equal('[{"a":[true,false]}]', json.encode({ { a = { true, false } } }))
        end)

        it("writes integers exactly and floats shortest", function()
            assert.are.equal("[9223372036854775807,-9223372036854775808]",
                json.encode({ math.maxinteger, math.mininteger }))
            assert.are.equal("[0.1,0.3333333333333333,-12.5,1e+300,5e-324]",
                json.encode({ 0.1, 1 / 3, -12.5, 1e300, 4.9406564584124654e-324 }))
        end)

        it("writes integral floats inside int64 as integers (Go rejects 1.0 for an int)", function()
            assert.are.equal("[1,1024,0,-3,9007199254740992]", json.encode({ 1.0, 2048 / 2, -0.0, -3.0, 2.0 ^ 53 }))
            assert.are.equal("[9.223372036854776e+18]", json.encode({ 2.0 ^ 63 }))
        end)

        it("keeps a number's source text while its value is unchanged", function()
            local v = json.decode('{"a":1e3,"b":1.50,"c":-0,"d":1.0,"e":[1E2,2]}')
            assert.are.equal('{"a":1e3,"b":1.50,"c":-0,"d":1.0,"e":[1E2,2]}', json.encode(v))
            v.a = v.a + 1
            v.b = 2.5
            v.d = 1   -- an integer now: not the float 1.0 any more
            v.e[1] = 7
            assert.are.equal('{"a":1001,"b":2.5,"c":-0,"d":1,"e":[7,2]}', json.encode(v))
        end)

        it("ignores a table's foreign metatable", function()
            local t = setmetatable({ b = 1, a = 2 }, { __index = function() return "x" end })
            assert.are.equal('{"a":2,"b":1}', json.encode(t))
        end)
    end)

    describe("errors", function()
        it("name a non-string key's type and where it is", function()
            assert.has_error(function() json.encode({ 1, 2, x = 1 }) end,
                "json.encode: $: key 1 (a number) in an object (object keys must be strings; a table is an " ..
                "array only when its keys are exactly 1..n)")
            assert.has_error(function() json.encode({ a = { b = { [true] = 1 } } }) end,
                "json.encode: $.a.b: a key of type boolean in an object (object keys must be strings; a table " ..
                "is an array only when its keys are exactly 1..n)")
            assert.has_error(function() json.encode({ a = { [2] = "x" } }) end,
                "json.encode: $.a: key 2 (a number) in an object (object keys must be strings; a table is an " ..
                "array only when its keys are exactly 1..n)")
            assert.has_error(function() json.encode(json.object({ [1.5] = 1 })) end,
                "json.encode: $: key 1.5 (a number) in an object (object keys must be strings; a table is an " ..
                "array only when its keys are exactly 1..n)")
        end)

        it("refuse a marked array that is not a sequence", function()
            assert.has_error(function() json.encode({ list = json.array({ [1] = 1, [3] = 3 }) }) end,
                "json.encode: $.list: an array must hold exactly the keys 1..n; this one has key 3 (a number) " ..
                "among 2 entries")
            assert.has_error(function() json.encode(json.array({ 1, name = "x" })) end,
                'json.encode: $: an array must hold exactly the keys 1..n; this one has key "name" (a string) ' ..
                "among 2 entries")
        end)

        it("refuse NaN, infinities, functions, userdata and nil", function()
            assert.has_error(function() json.encode({ x = 0 / 0 }) end,
                "json.encode: $.x: NaN or infinity cannot be encoded")
            assert.has_error(function() json.encode({ 1, math.huge }) end,
                "json.encode: $[2]: NaN or infinity cannot be encoded")
            assert.has_error(function() json.encode({ ["a-b"] = print }) end,
                'json.encode: $["a-b"]: a function cannot be encoded')
            assert.has_error(function() json.encode(io.stdout) end, "json.encode: $: a userdata cannot be encoded")
            assert.has_error(function() json.encode(nil) end,
                "json.encode: $: nil cannot be encoded (json.null is JSON null)")
        end)

        it("refuse cycles and nesting deeper than 64", function()
            local t = { a = {} }
            t.a.b = t
            assert.has_error(function() json.encode(t) end,
                "json.encode: $.a.b: a table that contains itself (a cycle)")
            local deep = json.array()
            local at = deep
            for _ = 2, 64 do
                at[1] = json.array()
                at = at[1]
            end
            assert.are.equal(string.rep("[", 64) .. string.rep("]", 64), json.encode(deep))
            at[1] = json.array()
            assert.has_error(function() json.encode(deep) end)
            local ok, err = pcall(json.encode, deep)
            assert.is_false(ok)
            assert.truthy(err:find("nesting deeper than 64", 1, true))
        end)

        it("refuse a shared table nowhere (only real cycles)", function()
            local shared = { 1 }
            assert.are.equal('{"a":[1],"b":[1]}', json.encode({ a = shared, b = shared }))
        end)

        it("report decode failures with json.c's message", function()
            assert.has_error(function() json.decode('{"a":1,}') end)
            local ok, err = pcall(json.decode, '{"a":1} x')
            assert.is_false(ok)
            assert.are.equal("json.decode: json: trailing garbage at byte 8", err)
            ok, err = pcall(json.decode, string.rep("[", 65) .. string.rep("]", 65))
            assert.is_false(ok)
            assert.truthy(err:find("nesting deeper than 64", 1, true))
            assert.are.equal(64, #json.encode(json.decode(string.rep("[", 32) .. string.rep("]", 32))))
            assert.has_error(function() json.decode({}) end)
        end)

        it("check json.object's key list", function()
            assert.has_error(function() json.object({}, { "a", 2 }) end,
                "json.object: keys[2] is a number, expected a string")
            assert.has_error(function() json.array(5) end)
        end)
    end)
end)
