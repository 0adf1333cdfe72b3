--[[
regfacade.rules: matchers for the lists policies keep (allow-lists of
repository prefixes, names with wildcards, sets of users), so a policy
writes `local allowed = rules.prefix(options.allow)` once instead of a loop
in every hook.

  local rules = require "regfacade.rules"
  local allowed  = rules.prefix { "library/", "acme/" }
  local internal = rules.glob { "internal/*", "**/secret-*" }
  local admins   = rules.set { "alice", "bob" }
  allowed("acme/app")      --> "acme/"      (the rule that matched)
  allowed("evil/app")      --> nil
  internal("a/b/secret-x") --> "**/secret-*"
  admins("alice")          --> "alice"

A matcher is a function of one value: the first rule (in the list's order)
that matches it, or nil. Anything that is not a string (nil for the ping's
repository, say) matches nothing. The list is read once, when the matcher
is made: make matchers in the policy's top-level code, from
regfacade.config.options. A rule that is not a string is an error naming
its position.

  rules.prefix(list)  the value starts with the rule
  rules.glob(list)    the whole value matches the rule, where "*" is any run
                      of characters but "/", "**" any run at all, "?" one
                      character but "/"; everything else is itself
  rules.set(list)     the value is the rule
  rules.any(m1, m2, ...)  the first of the matchers' answers that is not nil

Pure Lua, no I/O, no state between calls; the patterns it builds run under
the hook's budget like any other (lua_pattern.h).
]]

local rules = {}

local function strings(fn, list)
    if type(list) ~= "table" then
        error(string.format("rules.%s: expected a list of strings, got %s", fn, type(list)), 3)
    end
    local out = {}
    for i, v in ipairs(list) do
        if type(v) ~= "string" then
            error(string.format("rules.%s: entry %d is a %s, expected a string", fn, i, type(v)), 3)
        end
        out[i] = v
    end
    if #out ~= #list then
        error(string.format("rules.%s: the list has holes (%d entries before the first nil)", fn, #out), 3)
    end
    return out
end

function rules.prefix(list)
    local prefixes = strings("prefix", list)
    return function(value)
        if type(value) ~= "string" then
            return nil
        end
        for _, p in ipairs(prefixes) do
            if value:sub(1, #p) == p then
                return p
            end
        end
        return nil
    end
end

-- A glob as an anchored Lua pattern: every character that is special to
-- patterns is escaped, the wildcards become classes.
local function glob_pattern(glob)
    local out, i = { "^" }, 1
    while i <= #glob do
        local c = glob:sub(i, i)
        if c == "*" and glob:sub(i + 1, i + 1) == "*" then
            out[#out + 1] = ".*"
            i = i + 2
        else
            if c == "*" then
                out[#out + 1] = "[^/]*"
            elseif c == "?" then
                out[#out + 1] = "[^/]"
            elseif c:match("%W") then
                out[#out + 1] = "%" .. c
            else
                out[#out + 1] = c
            end
            i = i + 1
        end
    end
    out[#out + 1] = "$"
    return table.concat(out)
end

function rules.glob(list)
    local globs = strings("glob", list)
    local patterns = {}
    for i, g in ipairs(globs) do
        patterns[i] = glob_pattern(g)
    end
    return function(value)
        if type(value) ~= "string" then
            return nil
        end
        for i, p in ipairs(patterns) do
            if value:find(p) then
                return globs[i]
            end
        end
        return nil
    end
end

function rules.set(list)
    local members = {}
    for _, v in ipairs(strings("set", list)) do
        members[v] = true
    end
    return function(value)
        if type(value) == "string" and members[value] then
            return value
        end
        return nil
    end
end

function rules.any(...)
    local matchers = table.pack(...)
    for i = 1, matchers.n do
        if type(matchers[i]) ~= "function" then
            error(string.format("rules.any: argument %d is a %s, expected a matcher", i, type(matchers[i])), 2)
        end
    end
    return function(value)
        for i = 1, matchers.n do
            local r = matchers[i](value)
            if r ~= nil then
                return r
            end
        end
        return nil
    end
end

return rules
