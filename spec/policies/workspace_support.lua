-- What spec/policies/workspace_spec.lua and workspace_specs_spec.lua share:
-- the example's files, the config the server hands the policy, loading the
-- policy the way the core does, and the IDE and supervisor layers.
-- (Not a spec itself: busted runs only *_spec.lua.)
local testing = require "regfacade.testing"
local json = testing.json

local M = {}

M.DIR = "examples/workspace/"
M.BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

function M.read(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("a")
    f:close()
    return s
end

-- A deep copy of a decoded JSON value as plain tables.
function M.plain(v)
    if type(v) ~= "table" then
        return v
    end
    local t = {}
    for k, x in pairs(v) do
        t[k] = M.plain(x)
    end
    return t
end

-- The example's shipped config file (DIR .. name), decoded.
function M.shipped(name)
    return json.decode(M.read(M.DIR .. name))
end

-- regfacade.config as the server gives it for a shipped config: its
-- policy options, or `options` instead.
function M.config(shipped, options)
    return {
        upstreams = { ["local"] = { url = "http://127.0.0.1:5001", host = "127.0.0.1:5001", library_prefix = false } },
        default_upstream = "local",
        options = options or M.plain(shipped.policy.options),
    }
end

-- Loads DIR .. file as the core does: a chunk that sees only what the
-- sandbox offers, so a stray global fails here; the regfacade modules are
-- loaded afresh for each policy.
function M.load_policy(file, cfg)
    package.loaded["regfacade"] = { config = cfg, null = json.null, log = function() end }
    for _, m in ipairs { "regfacade.mirror", "regfacade.image", "regfacade.specs" } do
        package.loaded[m] = nil
    end
    local env = { require = require, ipairs = ipairs, pairs = pairs, error = error, type = type,
                  tostring = tostring, string = string, table = table, getmetatable = getmetatable,
                  rawget = rawget, pcall = pcall }
    local chunk = assert(loadfile(M.DIR .. file, "t", env))
    return chunk()
end

-- The IDE image: its own rootfs layer (dropped by skip = 1), then /ide; its
-- config carries Gitpod's env modifiers.
M.IDE_CONFIG = testing.oci_image {
    env = { "PATH=/bin", "GITPOD_ENV_SET_EDITOR=/ide/bin/code", "GITPOD_ENV_PREPEND_PATH=/ide/bin/remote-cli:" },
}.config
M.SUPERVISOR = testing.layer { name = "supervisor", created_by = "regfacade: supervisor" }
M.IDE_ROOTFS = testing.layer { name = "ide rootfs", config = M.IDE_CONFIG }
M.IDE = testing.layer { name = "ide", config = M.IDE_CONFIG }

-- The layer sources of both examples, with `extra` added.
function M.sources(extra)
    local t = { supervisor = M.SUPERVISOR, ["local/acme/ide:1.2"] = { M.IDE_ROOTFS, M.IDE } }
    for k, v in pairs(extra or {}) do
        t[k] = v
    end
    return t
end

return M
