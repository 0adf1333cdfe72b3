-- What policy_spec.lua and policy_specs_spec.lua beside it share: the
-- example's files, the config the policy runs with, loading it with
-- testing.policy (the server's own code), and the IDE and supervisor layers.
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

-- The config a shipped one runs with here: its upstream "local" (the
-- named layers it lists are built by build.sh, so they are left out: a
-- spec supplies their content), and its policy options or `options`.
function M.config(shipped, options)
    return {
        upstreams = { ["local"] = { url = "http://127.0.0.1:5001" } },
        default_upstream = "local",
        policy = { options = options or M.plain(shipped.policy.options) },
    }
end

-- DIR .. file with cfg, through the server's own code.
function M.load_policy(file, cfg)
    return testing.policy(M.DIR .. file, { config = cfg })
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
