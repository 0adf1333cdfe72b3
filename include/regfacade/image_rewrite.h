/*
 * image_rewrite: the policy's rewrite hook run on an assembled image, the
 * step between image_assemble() and image_finish(). The server and the
 * busted module (regfacade.core.assemble_rewrite) both run exactly this:
 *
 *   1. manifest and config become Lua tables (lua_json_push: order
 *      preserving, JSON null is json.null, empty arrays stay arrays);
 *   2. the hook is called as rewrite(img, req) with
 *        img = { manifest = <table>, config = <table>, layers = <array> }
 *      where img.layers describes the final layers in order, one table per
 *      manifest layer: { media_type =, digest =, size =, diff_id =,
 *      base = true|false }, and for an added layer source = "file" |
 *      "image" | "blob", name = (the config name, or the inline file path
 *      or image reference) and, for a layer from an image, config = (that
 *      image's config, e.g. for image.apply_env_modifiers) (information
 *      only: changing it changes nothing);
 *   3. the hook edits img in place (it may also replace img.manifest or
 *      img.config, or return a table used instead of img), or refuses by
 *      returning regfacade.deny(...) (lua_deny.h);
 *   4. img.manifest and img.config become JSON trees again
 *      (lua_json_to_tree), and the manifest's layer count must still match
 *      the config's rootfs.diff_ids.
 */
#ifndef REGFACADE_IMAGE_REWRITE_H
#define REGFACADE_IMAGE_REWRITE_H

#include <lua.h>
#include <stddef.h>

#include "regfacade/image.h"
#include "regfacade/json.h"
#include "regfacade/lua_deny.h"

/* Run the rewrite hook at rewrite_fn_index (nil: nothing to do, returns 0)
 * with the request at req_index (0: nil) on *manifest and *config, as
 * produced by image_assemble() for stack[0..n). On success returns 0 and
 * replaces *manifest and *config with new trees (the old ones are freed).
 * On failure returns -1, leaves both untouched and writes "rewrite hook:
 * <the hook's error>" or "rewrite: <what is wrong with its result>" into
 * err. Returns 1 when the hook returned a deny value: copied into *denied
 * (NULL: that is an error, -1), both trees untouched. The hook runs in
 * protected mode inside this call (a memory error in the conversions is
 * caught too), under whatever count hook the caller has set; the Lua stack
 * is as it was on return. */
int image_rewrite_run(lua_State *L, int rewrite_fn_index, int req_index, json_value **manifest, json_value **config,
                      const image_layer *stack, size_t n, lua_deny *denied, char *err, size_t errlen);

#endif
