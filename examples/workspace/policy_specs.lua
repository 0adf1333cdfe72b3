--[[
examples/workspace/policy_specs.lua: workspace images whose make-up comes
from outside, as image specs (docs/specs.md), in the style of Gitpod's
registry-facade "remote" provider.

A runtime asks for  <facade>/remote/<workspace-id>:<anything>.  The spec
hook says that name's image is described by the spec <workspace-id> of the
spec provider named in options (default "workspaces"); regfacade looks it up
(an orchestrator registered it through the admin API, or a spec service
answers it, or a fixed file holds it) and calls resolve(req, spec):

  spec { "base": "local/acme/app:1.0",
         "layers": ["supervisor", {"image": "local/acme/ide:1.2", "skip": 1}],
         "env": {"PATH": {"prepend": "/ide/bin:"}},
         "labels": {"io.example.workspace": "ws-123"} }
   ->  base image local/acme/app:1.0, then the supervisor layer (named in
       the config's "layers"), then the IDE image's layers minus its first;
       rewrite applies the IDE image's GITPOD_ENV_* modifiers, then the
       spec's env and labels, and annotates the manifest with the workspace
       id and the spec's base.

An unknown workspace id is a 404 (MANIFEST_UNKNOWN), so Gitpod's registry-facade
readiness probe (GET /v2/remote/not-a-valid-image/manifests/latest -> 404)
works. Every other name is a plain pull-through mirror (regfacade.mirror).

Options (config "policy.options"):
  spec_prefix    names under it have specs (default "remote/")
  spec_provider  the provider in specs.providers (default "workspaces")
  ide_bin        folder prepended to PATH when the spec's env does not
                 mention PATH (default none)
Config: examples/workspace/config_specs.json. Tested by
examples/workspace/policy_specs_spec.lua (busted) and
spec/integration/test_specs.py (containerd pulls and runs it).
]]

local image = require "regfacade.image"
local mirror = require "regfacade.mirror"
local regfacade = require "regfacade"
local specs = require "regfacade.specs"

local function options()
    return regfacade.config.options or {}
end

local function prefix()
    return options().spec_prefix or "remote/"
end

return {
    -- Which spec a name's image is made from: pure, no I/O.
    spec = function(req)
        local id = specs.id_from(req.repository, prefix())
        if not id then
            return nil
        end
        return { provider = options().spec_provider or "workspaces", id = id }
    end,

    resolve = function(req, spec)
        if spec == nil then
            return mirror.resolve(req)
        end
        return specs.resolve(req, spec)
    end,

    rewrite = function(img, req)
        local spec = req.spec
        if spec == nil then
            return -- a mirrored image: left as it is
        end
        specs.rewrite(img, spec)
        local bin = options().ide_bin
        if bin and (spec.env == nil or spec.env == regfacade.null or spec.env.PATH == nil) then
            image.env_prepend(img.config, "PATH", bin .. ":")
        end
        image.annotation_set(img.manifest, "io.regfacade.workspace.id", specs.id_from(req.repository, prefix()))
        if type(spec.base) == "string" then
            image.annotation_set(img.manifest, "io.regfacade.workspace.image", spec.base)
        end
    end,
}
