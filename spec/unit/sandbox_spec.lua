-- The policy sandbox (src/lua_sandbox.c) under attack: each escape a policy
-- might try fails for that call, through the server's own sandbox
-- (regfacade.sandbox, the same C code), and the sandbox keeps working for
-- the next call unless the call was stopped by a budget (then the server
-- closes the state and builds a new one: sb:broken()).
local testing = require "regfacade.testing"

local REQ = { method = "GET", kind = "manifest", repository = "evil/x", reference = "v1", client = {}, headers = {} }

-- A sandbox whose resolve hook runs body (a Lua chunk in a function). The
-- time budget is a minute unless a spec sets it: the specs about the
-- instruction budget must not depend on how busy the machine is.
local function policy(body, opts)
    opts = opts or {}
    opts.source = "return { resolve = function(req)\n" .. body .. "\nend }"
    opts.hook_time_ms = opts.hook_time_ms or 60000
    return testing.sandbox(opts)
end

local function fails(body, outcome, pattern, opts)
    local sb = policy(body, opts)
    local ok, got, msg = sb:call("resolve", REQ)
    assert.is_false(ok, "the call succeeded: " .. body)
    if type(outcome) == "table" then
        assert.is_true(outcome[got] ~= nil, "outcome " .. tostring(got) .. ": " .. tostring(msg))
    elseif outcome then
        assert.are.equal(outcome, got, msg)
    end
    if pattern then
        assert.matches(pattern, msg)
    end
    return sb, msg
end

describe("the policy sandbox", function()
    it("runs on Lua 5.4", function()
        local sb = policy("return _VERSION")
        assert.are.same({ true, "Lua 5.4" }, { sb:call("resolve", REQ) })
    end)

    describe("refuses", function()
        it("os.execute, os.exit, os.getenv, os.remove", function()
            fails("os.execute('id')", "error", "field 'execute'")
            fails("os.exit(1)", "error", "field 'exit'")
            fails("return os.getenv('HOME')", "error", "field 'getenv'")
            fails("os.remove('/tmp/x')", "error", "field 'remove'")
        end)

        it("io.popen and io.open outside the data files", function()
            fails("io.popen('id')", "error", "field 'popen'")
            local sb = policy("return io.open('/etc/shadow')")
            local ok, f, err = sb:call("resolve", REQ)
            assert.is_true(ok)
            assert.is_nil(f)
            assert.matches("not a data file this policy may read", err)
            fails("return assert(io.open('/etc/passwd')):read('a')", "error", "not a data file")
            fails("return require('regfacade').read_file('/etc/shadow')", "error", "not a data file")
            -- relative paths cannot climb out either
            fails("return require('regfacade').read_file('../../../../etc/shadow')", "error", "not a data file",
                { data_dir = "spec/fixtures", base_dir = "spec/fixtures" })
        end)

        it("writing a data file", function()
            fails("return io.open('spec/fixtures/oci_config.json', 'w')", "error", "read%-only",
                { data_files = { "spec/fixtures/oci_config.json" } })
        end)

        it("bytecode: load with mode b, string.dump", function()
            fails("return string.dump(function() end)", "error", "field 'dump'")
            local sb = policy("return load('\\27Lua', 'x', 'b')")
            local ok, f, err = sb:call("resolve", REQ)
            assert.is_true(ok)
            assert.is_nil(f)
            assert.matches('mode "b" is not allowed', err)
            sb = policy("return load('\\27LuaT\\0')")
            ok, f, err = sb:call("resolve", REQ)
            assert.is_true(ok)
            assert.is_nil(f)
            assert.matches("binary chunk", err)
        end)

        it("the debug library, package, loadlib, dofile, loadfile", function()
            fails("return debug.getregistry()", "error", "undefined global 'debug'")
            fails("return package.loadlib('libc.so.6', 'system')", "error", "undefined global 'package'")
            fails("return require('debug')", "error", "module 'debug' not found")
            fails("return dofile('/etc/passwd')", "error", "undefined global 'dofile'")
            fails("return loadfile('/etc/passwd')", "error", "undefined global 'loadfile'")
            fails("return require('../../etc/passwd')", "error", "not found")
        end)

        it("collectgarbage beyond count", function()
            fails("collectgarbage('stop')", "error", "only \"count\"")
            fails("collectgarbage()", "error", "only \"count\"")
            local sb = policy("return collectgarbage('count') > 0")
            assert.are.same({ true, true }, { sb:call("resolve", REQ) })
        end)
    end)

    describe("globals", function()
        it("cannot be assigned", function()
            fails("counter = 1", "error", "assignment to global 'counter'")
            fails("_G.counter = 1", "error", "assignment to global 'counter'")
            fails("_ENV.counter = 1", "error", "assignment to global 'counter'")
            fails("rawset(_G, 'counter', 1)", "error", "read%-only")
            fails("pairs = nil", "error", "assignment to global 'pairs'")
        end)

        it("reading an undefined one is an error", function()
            fails("return undefined_name", "error", "undefined global 'undefined_name'")
        end)

        it("do not change between requests", function()
            local sb = testing.sandbox { source = [[
                return { resolve = function(req)
                    if req.repository == "evil/set" then
                        seen = req.repository
                    end
                    return { upstream = "x", repository = rawget(_G, "seen") or "none" }
                end }]] }
            local ok = sb:call("resolve", { repository = "evil/set" })
            assert.is_false(ok)
            local _, answer = sb:call("resolve", { repository = "good/app" })
            assert.are.same({ upstream = "x", repository = "none" }, answer)
        end)

        it("libraries and modules are read-only", function()
            fails("string.upper = function() return 'x' end", "error", "read%-only table")
            fails("table.insert = nil", "error", "read%-only table")
            fails("require('regfacade.mirror').resolve = nil", "error", "read%-only table")
            fails("require('regfacade').config.default_upstream = 'x'", "error", "read%-only table")
            fails("require('regfacade').config.options.x = 1", "error", "read%-only table")
            fails("require('cjson').encode = nil", "error", "read%-only table")
            fails("rawset(string, 'upper', print)", "error", "read%-only")
        end)
    end)

    describe("metatable tricks", function()
        it("cannot reach or change protected metatables", function()
            fails("getmetatable('').__index.upper = nil", "error", "index a boolean")
            fails("setmetatable(string, {})", "error", "protected metatable")
            fails("setmetatable(_G, {})", "error", "protected metatable")
        end)

        it("refuses __gc finalizers (they run outside any budget)", function()
            fails("setmetatable({}, { __gc = function() while true do end end })", "error", "__gc")
        end)

        it("an __index loop is stopped", function()
            fails([[local t = setmetatable({}, {})
                    getmetatable(t).__index = function(t, k) return t[k] end
                    return t.x]], "error", "stack overflow")
        end)

        it("a __close loop is stopped by the budget", function()
            fails([[do local x <close> = setmetatable({}, { __close = function() while true do end end }) end]],
                "instructions")
        end)
    end)

    describe("budgets", function()
        it("while true do end is stopped by the instruction budget", function()
            local sb = fails("while true do end", "instructions", "policy resolve exceeded its instruction budget")
            assert.is_true(sb:broken())
        end)

        it("a slow loop is stopped by the time budget", function()
            fails("while true do local s = string.rep('x', 1000):upper() end", "time", "time budget",
                { hook_time_ms = 30, hook_instructions = 1e10 })
        end)

        it("the budget names the line", function()
            local _, msg = fails("local x = 0\nwhile true do x = x + 1 end", "instructions")
            assert.matches("%(policy source%):3:", msg)
        end)

        it("pcall cannot swallow a stopped call", function()
            fails("while true do pcall(function() while true do end end) end", "instructions")
            fails("for i = 1, 100 do pcall(error) end while true do pcall(pcall, function() while true do end end) end",
                "instructions")
        end)

        local STOPPED = { instructions = true, time = true }

        it("coroutines share the call's budget", function()
            fails("local co = coroutine.wrap(function() while true do end end) co()", "instructions")
            fails([[local co = coroutine.create(function() while true do coroutine.yield() end end)
                    while true do coroutine.resume(co) end]], STOPPED, nil, { hook_time_ms = 1000 })
            fails([[local co = coroutine.wrap(function() while true do pcall(coroutine.yield) end end)
                    while true do pcall(co) end]], STOPPED, nil, { hook_time_ms = 1000 })
        end)

        it("a coroutine made while loading is still budgeted in a hook", function()
            local sb = testing.sandbox { hook_time_ms = 60000, source = [[
                local spin = coroutine.wrap(function() while true do end end)
                return { resolve = function(req) spin() end }]] }
            local ok, outcome = sb:call("resolve", REQ)
            assert.is_false(ok)
            assert.are.equal("instructions", outcome)
        end)

        it("string.rep memory bombs fail on the memory cap", function()
            fails("return string.rep('x', 2^40)", "error", "larger than the policy's memory cap")
            fails("return ('x'):rep(1e9, ',')", "error", "larger than the policy's memory cap")
            local sb = fails([[local t = {}
                for i = 1, 1e8 do t[i] = { i, i, i } end]], "memory", "memory cap",
                { memory_bytes = 8 * 1024 * 1024, hook_time_ms = 10000, hook_instructions = 1e10 })
            assert.is_true(sb:broken())
            fails("local s = 'x' while true do s = s .. s end", "memory", "memory cap",
                { memory_bytes = 8 * 1024 * 1024 })
        end)

        it("memory caught by pcall and retried is still stopped", function()
            fails("local t = {} while true do pcall(function() t[#t + 1] = string.rep('y', 1e5) .. #t end) end",
                STOPPED, nil, { memory_bytes = 4 * 1024 * 1024, hook_time_ms = 1000 })
        end)

        it("deep recursion fails", function()
            fails("local function f(n) return 1 + f(n + 1) end return f(1)", "error", "stack overflow")
            -- through pcall: the C stack limit, caught and raised again
            fails("local function f() local ok, e = pcall(f) if not ok then error(e, 0) end end f()", "error",
                "stack overflow")
        end)

        it("after a stopped call the state refuses to run again", function()
            local sb = fails("while true do end", "instructions")
            local ok, _, msg = sb:call("resolve", REQ)
            assert.is_false(ok)
            assert.matches("cannot run again", msg)
        end)
    end)

    describe("what stays available", function()
        it("string, table, math, utf8, os.time, cjson, regfacade", function()
            local sb = policy([[
                local cjson = require "cjson"
                local rf = require "regfacade"
                return {
                    s = ("abc"):upper(), n = math.max(1, 2), t = table.concat({ "a", "b" }, ","),
                    u = utf8.char(72), time = type(os.time()), c = cjson.encode({ 1, 2 }),
                    d = rf.digest("abc"), j = rf.json.encode(rf.json.decode('{"b":1,"a":2}')),
                    co = coroutine.wrap(function() coroutine.yield(7) end)(),
                    l = load("return 1 + 1")(),
                }]])
            local ok, v = sb:call("resolve", REQ)
            assert.is_true(ok, v)
            assert.are.same({ s = "ABC", n = 2, t = "a,b", u = "H", time = "number", c = "[1,2]",
                d = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                j = '{"b":1,"a":2}', co = 7, l = 2 }, v)
        end)

        it("pairs, ipairs and # see through read-only tables", function()
            local sb = testing.sandbox { config = { upstreams = { a = { url = "u" }, b = { url = "v" } },
                                                    options = { list = { "x", "y" } } },
                source = [[
                local rf = require "regfacade"
                return { resolve = function(req)
                    local names = {}
                    for k in pairs(rf.config.upstreams) do names[#names + 1] = k end
                    table.sort(names)
                    local items = {}
                    for _, v in ipairs(rf.config.options.list) do items[#items + 1] = v end
                    return { names = names, items = items, n = #rf.config.options.list }
                end }]] }
            local ok, v = sb:call("resolve", REQ)
            assert.is_true(ok, v)
            assert.are.same({ names = { "a", "b" }, items = { "x", "y" }, n = 2 }, v)
        end)

        it("data files the config allows", function()
            local sb = policy([[
                local f = assert(io.open("oci_config.json"))
                local a = f:read("a")
                f:close()
                return #a == #require("regfacade").read_file("oci_config.json")
            ]], { data_files = { "oci_config.json" }, base_dir = "spec/fixtures" })
            assert.are.same({ true, true }, { sb:call("resolve", REQ) })
        end)

        it("print and regfacade.log write log lines", function()
            local sb = policy("print('hello', 1) require('regfacade').log('debug', 'x') return true")
            assert.are.same({ true, true }, { sb:call("resolve", REQ) })
            fails("require('regfacade').log('loud', 'x')", "error", "level must be")
        end)
    end)

    -- string.find/match/gmatch/gsub are the sandbox's own (src/lua_pattern.c):
    -- the same answers as Lua's, and their matching counts against the budget.
    describe("patterns", function()
        -- Each expression runs in busted's own Lua (the stock string library)
        -- and in the sandbox; results and error messages must agree.
        local SAME = {
            "('hello world'):find('o w')", "('hello world'):find('o', 6)", "('hello'):find('l', -2)",
            "('hello'):find('')", "('hello'):find('', 10)", "('hello'):find('', 6)", "('a.b'):find('.', 1, true)",
            "('a+b'):find('+', 1, true)", "('x\\0y'):find('\\0')", "('hello'):find('l+')", "('hello'):find('^h')",
            "('hello'):find('^e')", "('hello'):find('o$')", "('a$b'):find('$b')", "('  x'):match('^%s*(.-)%s*$')",
            "('key = value'):match('(%w+)%s*=%s*(%w+)')", "('abc'):match('()b()')", "('[x]'):match('%[(.)%]')",
            "('THE (quick) fox'):find('%((%a+)%)')", "('f(a(b)c)d'):match('%b()')", "('abc'):match('%bxy')",
            "('THE (quick) fox'):match('%f[%a]%a+', 5)", "('hello hello'):match('(h%a+) %1')",
            "('aaab'):match('a-b')", "('aaab'):match('a*')", "('aaab'):match('a?a?b')", "('x'):match('[]]')",
            "(']'):match('[]]')", "('-'):match('[a-]')", "('b'):match('[^a]')", "('^'):match('[%^]')",
            "('Z9'):match('[%u%d]+')", "('a1 b2'):match('%W')", "('tab\\there'):match('%c')",
            "('x'):match('.-$')", "('one two  three'):gsub('%s+', '_')", "('abc'):gsub('', '-')",
            "('abc'):gsub('%w', '%0%0')", "('abc'):gsub('(%w)', '<%1>', 2)", "('a,b'):gsub('(%w)', { a = 'A' })",
            "('a b'):gsub('%w', function(c) return c:upper() end)", "('abc'):gsub('b', false and 1 or '%%')",
            "('hello world'):gsub('o', 0)", "('x=1, y=2'):gsub('(%w+)=(%w+)', '%2=%1')", "('abc'):gsub('^a', 'X')",
            "('abc'):gsub('()', '%1')", "(function() local t = {} for k, v in ('a=1, b=2'):gmatch('(%w+)=(%w+)') "
                .. "do t[#t + 1] = k .. v end return table.concat(t, ';') end)()",
            "(function() local t = {} for w in ('one two'):gmatch('%a+') do t[#t + 1] = w end return #t end)()",
            "(function() local t = {} for w in ('abc'):gmatch('', 2) do t[#t + 1] = 'e' end return #t end)()",
            "(function() local n = 0 for a, b in ('aXbX'):gmatch('()X()') do n = n + a + b end return n end)()",
            -- errors: the same messages
            "('x'):find('%')", "('x'):find('[a')", "('x'):find('(x')", "('x'):find('x)')", "('x'):find('%1')",
            "('x'):find('%f')", "('x'):find('%b')", "('x'):gsub('x', '%2')", "('x'):gsub('x', '%')",
            "('x'):gsub('x', {x = {}})", "('x'):gsub('x', true)", "('x'):find(('('):rep(40))",
            "('x'):match(('(x?)'):rep(40))", "('x'):match(('x?'):rep(300))",
        }

        local function tail(msg)
            msg = tostring(msg):gsub("\nstack traceback:.*", "")
            return (msg:gsub("^.-:%d+: ", ""))
        end

        it("give the same answers and errors as Lua's own", function()
            local sb = policy("return true")
            for _, expr in ipairs(SAME) do
                local code = "return " .. expr
                local want = table.pack(pcall(assert(load(code))))
                local got = table.pack(sb:run(code))
                if want[1] then
                    assert.is_true(got[1], expr .. ": " .. tostring(got[3]))
                    assert.are.same({ table.unpack(want, 2, want.n) }, { table.unpack(got, 2, got.n) }, expr)
                else
                    assert.is_false(got[1], expr .. " succeeded in the sandbox")
                    assert.are.equal(tail(want[2]), tail(got[3]), expr)
                end
            end
        end)

        -- Backtracking that takes Lua's own matcher far longer than any
        -- budget: 6 lazy captures with no match anywhere (over 60 characters
        -- a second; over 200, an hour).
        local EVIL = "local s = string.rep('a', 200) return s:%s('(.-)(.-)(.-)(.-)(.-)(.-)b'%s)"

        for _, fn in ipairs { "find", "match", "gsub", "gmatch" } do
            it("a catastrophic pattern in string." .. fn .. " is stopped by the instruction budget", function()
                local body = fn == "gmatch" and "local s = string.rep('a', 200) for x in s:gmatch('(.-)(.-)(.-)"
                    .. "(.-)(.-)(.-)b') do end" or string.format(EVIL, fn, fn == "gsub" and ", 'x'" or "")
                local sb, msg = fails(body, "instructions", "policy resolve exceeded its instruction budget")
                assert.matches("%(policy source%):%d+:", msg) -- the line of the call
                assert.is_true(sb:broken())
            end)
        end

        it("and by the time budget when the instructions allow it", function()
            fails(string.format(EVIL, "match", ""), "time", "policy resolve exceeded its time budget",
                { hook_time_ms = 50, hook_instructions = 1e11 })
        end)

        it("pcall cannot swallow a stopped pattern", function()
            fails("while true do pcall(string.match, string.rep('a', 200), '(.-)(.-)(.-)(.-)(.-)(.-)b') end",
                "instructions")
        end)

        it("count as instructions: a cheap pattern passes, many of them do not", function()
            local sb = policy("local n = 0 for i = 1, 100 do n = n + #(('x'):rep(1000):gsub('x', 'y')) end return n",
                { hook_instructions = 1e6 })
            assert.are.same({ true, 100000 }, { sb:call("resolve", REQ) })
            fails("for i = 1, 100 do local s = ('x'):rep(20000):gsub('x', 'y') end", "instructions", nil,
                { hook_instructions = 1e6 })
        end)
    end)

    -- cjson (Debian's lua-cjson) is always there, with limits no policy raises.
    describe("cjson", function()
        it("keeps its depth limits fixed at 64", function()
            local sb = policy([[
                local cjson, safe = require "cjson", require "cjson.safe"
                return { cjson.decode_max_depth(), cjson.encode_max_depth(), safe.decode_max_depth(),
                         cjson.new().decode_max_depth() }]])
            assert.are.same({ true, { 64, 64, 64, 64 } }, { sb:call("resolve", REQ) })
            for _, expr in ipairs { "require('cjson').decode_max_depth(100000)", "require('cjson').encode_max_depth(100)",
                    "require('cjson.safe').decode_max_depth(1000)", "require('cjson').new().decode_max_depth(1000)" } do
                fails(expr, "error", "max_depth: fixed at 64 by the policy sandbox")
            end
        end)

        it("refuses deep documents with an error (decode and encode), never a crash", function()
            local deep = "string.rep('[', 100000) .. string.rep(']', 100000)"
            fails("return require('cjson').decode(" .. deep .. ")", "error", "too many nested data structures")
            fails("return require('cjson').new().decode(" .. deep .. ")", "error", "too many nested data structures")
            local sb = policy("return require('cjson.safe').decode(" .. deep .. ")")
            local ok, v, err = sb:call("resolve", REQ)
            assert.is_true(ok)
            assert.is_nil(v)
            assert.matches("too many nested data structures", err)
            fails("local t = {} local c = t for i = 1, 100 do c[1] = {} c = c[1] end return require('cjson').encode(t)",
                "error", "excessive nesting")
        end)

        it("refuses texts over 1 MiB (regfacade.json is for large documents)", function()
            local big = "'[' .. string.rep('1,', 600000) .. '1]'"
            fails("return require('cjson').decode(" .. big .. ")", "error",
                "%(policy source%):%d+: cjson.decode: the text is 1200003 bytes, more than the policy sandbox allows")
            local sb = policy("return require('cjson.safe').decode(" .. big .. ")")
            local ok, v, err = sb:call("resolve", REQ)
            assert.is_true(ok)
            assert.is_nil(v)
            assert.matches("more than the policy sandbox allows", err)
            sb = policy("return #require('cjson').decode('[' .. string.rep('1,', 1000) .. '1]')")
            assert.are.same({ true, 1001 }, { sb:call("resolve", REQ) })
        end)
    end)
end)
