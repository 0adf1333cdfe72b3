--[[
examples/workspace/policy.lua: workspace images in the style of Gitpod's
registry-facade (see README.md next to this file).

A runtime asks for  <facade>/remote/<workspace-id>:<anything>  and gets the
workspace's own image (the user's base image) with two things on top:

  1. the supervisor: a .tar.gz file layer, named "supervisor" in the
     config's "layers" section;
  2. the IDE: the layers of an IDE image, minus its first `skip` layers
     (the IDE image's own base), written inline as { image =, skip = }.

and a rewritten config: PATH gets the IDE's bin folder in front
(image.env_prepend), and the env modifiers the IDE image carries in its own
config (GITPOD_ENV_SET_X / _APPEND_X / _PREPEND_X, Gitpod's
convention) are applied (image.apply_env_modifiers). The manifest gets
annotations naming the workspace and its base image.

Every other request is a plain pull-through mirror (regfacade.mirror).

Options (config "policy.options"):
  workspaces  { ["<id>"] = { image = "UPSTREAM/repo:tag", ide = "UPSTREAM/repo:tag" } }
              image: the user's base image; ide: optional, overrides ide.image
  ide         { image = "UPSTREAM/repo:tag", skip = N, bin = "/ide/bin" }
A reference is "UPSTREAM/repository:tag" or "UPSTREAM/repository@sha256:...",
UPSTREAM a name from the config's "upstreams".

Hooks do no I/O: resolve only says where the base comes from and which
layers go where; regfacade fetches, hashes, assembles and caches. The same
options give the same image digest in every process (content addressing), and
changing a workspace's image, the IDE or the supervisor file gives a new one.
Tested by examples/workspace/policy_spec.lua (busted, through the server's own
assembly code) and spec/integration/test_layers.py (containerd runs it).
]]

local image = require "regfacade.image"
local mirror = require "regfacade.mirror"
local regfacade = require "regfacade"

local WORKSPACE_PREFIX = "remote/"

local function options()
    return regfacade.config.options or {}
end

-- "UPSTREAM/repo:tag" or "UPSTREAM/repo@sha256:..." -> upstream, repository,
-- reference: the library's parser (the spec-based policy uses the same one).
local split_ref = require("regfacade.specs").split_ref

-- The workspace a request is for: id and its options, or nil.
local function workspace_of(req)
    local repository = req.repository or ""
    local id = repository:sub(1, #WORKSPACE_PREFIX) == WORKSPACE_PREFIX
        and repository:sub(#WORKSPACE_PREFIX + 1) or nil
    if not id then
        return nil
    end
    local ws = (options().workspaces or {})[id]
    return id, ws
end

local function ide_options()
    local ide = options().ide or {}
    return {
        image = ide.image,
        skip = ide.skip or 1,
        bin = ide.bin or "/ide/bin",
    }
end

return {
    resolve = function(req)
        local id, ws = workspace_of(req)
        if not id then
            return mirror.resolve(req)
        end
        if not ws then
            return nil, { status = 404, code = "NAME_UNKNOWN", message = "no workspace \"" .. id .. "\"" }
        end
        local upstream, repository, reference = split_ref(ws.image)
        -- A request by digest names bytes regfacade already generated (the
        -- digest a tag request answered): pass it through. (regfacade serves
        -- a requested digest as it is anyway; this keeps the answer honest.)
        if req.reference and req.reference:match("^sha256:") then
            reference = req.reference
        end
        local ide = ide_options()
        local layers = { "base", "supervisor" }
        local ide_image = ws.ide or ide.image
        if ide_image then
            layers[#layers + 1] = { image = ide_image, skip = ide.skip, created_by = "regfacade: IDE " .. ide_image }
        end
        return {
            upstream = upstream,
            repository = repository,
            reference = reference,
            layers = layers,
        }
    end,

    rewrite = function(img, req)
        local id, ws = workspace_of(req)
        if not ws then
            return -- a mirrored image: left as it is
        end
        image.env_prepend(img.config, "PATH", ide_options().bin .. ":")
        -- Gitpod's env modifiers, from each added image's config,
        -- applied once per image, in stack order.
        local seen = {}
        for _, layer in ipairs(img.layers) do
            if layer.source == "image" and layer.config and not seen[layer.name] then
                seen[layer.name] = true
                image.apply_env_modifiers(img.config, layer.config)
            end
        end
        image.annotation_set(img.manifest, "io.regfacade.workspace.id", id)
        image.annotation_set(img.manifest, "io.regfacade.workspace.image", ws.image)
    end,
}
