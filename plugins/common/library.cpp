// The two symbols libtrtglm_plugins.so exports (see exports.map): TensorRT's IPluginRegistry::loadLibrary and
// trtexec --staticPlugins call getCreators for the IPluginV3 creators and setLoggerFinder for a logger. Nothing
// else is visible, and the library links no libnvinfer: TensorRT itself provides what it calls.
#include "attention/attention_plugin.h"
#include "common/plugin.h"
#include "residual_norm/residual_norm_plugin.h"
#include "rotary/rotary_plugin.h"

#include <atomic>

// Visible despite -fvisibility=hidden; exports.map then keeps everything else local.
#define TRTGLM_EXPORT __attribute__((visibility("default")))

namespace trtglm
{
namespace
{
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};
} // namespace

void logError(char const* msg) noexcept
{
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(nvinfer1::ILogger::Severity::kERROR, msg);
    }
}
} // namespace trtglm

extern "C" TRTGLM_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    trtglm::gLoggerFinder.store(finder);
}

extern "C" TRTGLM_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static trtglm::Creator<trtglm::ResidualNormPlugin> residualNorm;
    static trtglm::Creator<trtglm::RotaryPlugin> rotary;
    static trtglm::Creator<trtglm::AttentionPlugin> attention;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&residualNorm, &rotary, &attention};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}
